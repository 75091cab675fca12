"""Your own features: one `.npz` file per backbone, `<npz.dir>/<backbone>.npz` (config.features = "npz").

Arrays, as `np.savez(path, image=..., text=..., caption_image=...)` writes them:
- `image`: [n_images, d_v] pooled, or [n_images, tokens, d_v] token features (floating point);
- `text`: [n_captions, d_t] or [n_captions, tokens, d_t];
- `caption_image`: [n_captions] integers, the row of `image` that each caption describes;
- `image_mask`, `text_mask` (optional, token features only): [n, tokens], 1 for a real token; the
  padding slots (0) are set to zero on loading, so whatever they hold (NaN too) cannot reach a result.
Features go in as they are (no normalisation); the paper's noise, normalize(v + σz), is meant for
unit vectors, so L2-normalise CLIP-like embeddings before saving them.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from typing import Callable

import numpy as np

from fusion_jax.data.aligned import aligned, npz_array
from fusion_jax.data.dataset import DataUnavailableError
from fusion_jax.data.featureset import FeatureSet
from fusion_jax.files import atomic_write_npz, safe_name, sha256

REQUIRED = ("image", "text", "caption_image")
OPTIONAL = ("image_mask", "text_mask")
HUGE = 1e15  # a margin below where squares summed over the dims overflow float32 (about 1.8e19 / sqrt(d))


def feature_file(directory: str, backbone: str) -> str:
    """The file that holds `backbone`'s features."""
    return os.path.join(directory, f"{backbone}.npz")


def check_dir(directory: str) -> None:
    """Raise ValueError unless `directory` (npz.dir) is a folder; the message completes "config.npz.dir: "."""
    if not directory:
        raise ValueError("is empty; features 'npz' needs the folder of <backbone>.npz files")
    if not os.path.isdir(directory):
        raise ValueError(f"{directory!r} is not a folder")


def names(directory: str) -> list[str]:
    """The backbone names of npz.dir: its .npz files without the ending."""
    return sorted(f[:-4] for f in os.listdir(directory)
                  if f.endswith(".npz") and os.path.isfile(os.path.join(directory, f)))


def check(directory: str, backbone: str) -> None:
    """Raise ValueError unless `backbone` names a features file in `directory` (a name, not a path)."""
    if backbone.endswith(".npz"):
        raise ValueError(f"backbone {backbone!r}: name a file of npz.dir without its .npz ending")
    if not backbone or safe_name(backbone) != backbone:
        # Group, checkpoint and result names are made from it: other characters could make two collide.
        if any(c in backbone for c in "(),'\""):
            raise ValueError(f"backbone {backbone!r}: several names must be a quoted tuple of strings, "
                             f"\"--config.backbones=('a','b')\"")
        raise ValueError(f"backbone {backbone!r}: a file name of letters, digits and _ . = - only (rename the file)")
    path = feature_file(directory, backbone)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} (backbone {backbone!r}) is a folder, not a file")
    if os.path.islink(path) and not os.path.exists(path):
        target = os.path.join(os.path.dirname(path), os.readlink(path))  # a relative target is the link's folder's
        why = "which does not exist" if not os.path.lexists(target) else "which cannot be followed (a loop of links?)"
        raise ValueError(f"{path!r} (backbone {backbone!r}) is a link to {target!r}, {why}")
    if not os.path.isfile(path):
        found = names(directory)
        raise ValueError(f"no features file {path!r} for backbone {backbone!r}; "
                         + (f"npz.dir holds: {', '.join(found)}" if found else f"npz.dir {directory!r} holds no .npz file"))


def save(path: str, fs: FeatureSet) -> None:
    """Write `fs` in this format (atomically), for example features another source made, to share them or
    to run them again as `npz`; `load` reads back the same arrays."""
    arrays = {"image": fs.image, "text": fs.text, "caption_image": fs.caption_image}
    arrays.update({n: m for n, m in (("image_mask", fs.image_mask), ("text_mask", fs.text_mask)) if m is not None})
    atomic_write_npz(path, arrays)


def _nonfinite_rows(x: np.ndarray, block_bytes: int = 64 << 20) -> np.ndarray:
    """The rows of `x` [n, ...] holding NaN or Inf, read in blocks of about `block_bytes` (a mask of the whole
    array would add a quarter of its size to the load's peak)."""
    block, rows = max(1, block_bytes // max(1, x[:1].nbytes)), [np.zeros(0, np.int64)]
    for i in range(0, len(x), block):
        part = x[i:i + block]
        rows.append(i + np.flatnonzero(~np.isfinite(part).reshape(len(part), -1).all(axis=1)))
    return np.concatenate(rows)


def _member(z: np.lib.npyio.NpzFile, name: str, bad: Callable[[str], Exception]) -> np.ndarray:
    """Array `name` of an open .npz, or `bad` naming it where it cannot be read (Python objects, a damaged
    member)."""
    try:
        return npz_array(z, name)
    except ValueError as e:
        if "allow_pickle" in str(e):
            kind = {"caption_image": "integers", "image_mask": "numbers 0 and 1", "text_mask": "numbers 0 and 1"}.get(
                name, "floating point")
            raise bad(f"{name} is an array of Python objects, which only pickle reads (not loaded, as it could run "
                      f"code): save it as {kind}") from None
        raise bad(f"array {name} cannot be read ({type(e).__name__}: {e}); save the file again") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise bad(f"array {name} cannot be read ({type(e).__name__}: {e}); save the file again") from None


def load(path: str) -> FeatureSet:
    """The FeatureSet in `path`, checked (DataUnavailableError names the file and what is wrong)."""
    bad = lambda why: DataUnavailableError(f"features file {path}: {why}")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        if not head.startswith((b"PK", b"\x93NUMPY")):  # a zip archive (.npz) or one array (.npy)
            raise bad("cannot be read as .npz: it is not a zip archive of arrays as np.savez writes "
                      + (f"(it begins {head!r})" if head else "(it is empty)"))
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise bad("holds one array (.npy), not named arrays (.npz): save it with np.savez")
        with z:
            names = set(z.files)
            if missing := [n for n in REQUIRED if n not in names]:
                raise bad(f"missing array(s) {', '.join(missing)}; it needs {', '.join(REQUIRED)} "
                          f"(it holds {', '.join(sorted(names)) or 'none'})")
            if extra := sorted(names - set(REQUIRED) - set(OPTIONAL)):
                raise bad(f"unknown array(s) {', '.join(extra)}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
            arrays = {n: _member(z, n, bad) for n in sorted(names)}
        if not_arrays := sorted(n for n, x in arrays.items() if not isinstance(x, np.ndarray)):
            raise bad(f"array(s) {', '.join(not_arrays)}: not .npy data (np.savez writes each array as .npy)")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise bad(f"cannot be read as .npz ({type(e).__name__}: {e})") from None
    for n in ("image", "text"):
        if arrays[n].ndim not in (2, 3):
            raise bad(f"{n} has shape {arrays[n].shape}; expected [n, d] (pooled) or [n, tokens, d]")
        if not np.issubdtype(arrays[n].dtype, np.floating):
            raise bad(f"{n} has dtype {arrays[n].dtype}; expected floating point")
        if arrays[n].ndim in (2, 3) and 0 in arrays[n].shape:
            raise bad(f"{n} has shape {arrays[n].shape}: it needs rows, and features of at least one dimension")
        mask = arrays.get(f"{n}_mask")
        if mask is not None and arrays[n].ndim != 3:
            raise bad(f"{n}_mask is given, but {n} is not token features [n, tokens, d]")
        if mask is not None and not np.isin(mask, (0, 1)).all():
            raise bad(f"{n}_mask must hold 0 and 1 only")
        if mask is not None and mask.ndim == 2 and (empty := np.flatnonzero(mask.sum(axis=1) == 0)).size:
            raise bad(f"{n}_mask has rows with no real token (rows {empty[:5].tolist()}): every row needs one")
    if arrays["caption_image"].dtype.kind not in "iu":  # not timedelta64, which numpy counts as an integer type
        raise bad(f"caption_image has dtype {arrays['caption_image'].dtype}; expected integers")
    if arrays["caption_image"].shape != arrays["text"].shape[:1]:
        raise bad(f"text has {len(arrays['text'])} rows but caption_image has shape "
                  f"{arrays['caption_image'].shape}: one image row per caption, [n_captions]")
    masks = {n: aligned(arrays.pop(n), np.float32) for n in OPTIONAL if n in arrays}
    try:  # the index checked before it is narrowed to int32; values beyond float32 become Inf, refused below
        image, text = (aligned(arrays.pop(n), np.float32) for n in ("image", "text"))
        for x, mask in ((image, masks.get("image_mask")), (text, masks.get("text_mask"))):
            if mask is not None and mask.shape == x.shape[:2]:  # else FeatureSet says what is wrong
                x[mask == 0] = 0  # the heads mask padding out, but NaN there would survive their zero weights
        fs = FeatureSet(image=image, text=text, caption_image=arrays["caption_image"].astype(np.int64), **masks)
    except ValueError as e:
        raise bad(str(e)) from None
    for n, x in (("image", fs.image), ("text", fs.text)):
        rows = _nonfinite_rows(x)
        if rows.size:
            raise bad(f"{n} holds NaN or Inf (as float32) in rows {rows[:5].tolist()}{'...' if rows.size > 5 else ''}")
        if (peak := max(float(x.max()), -float(x.min()))) > HUGE:
            raise bad(f"{n} reaches |x| = {peak:.3g}, above {HUGE:g}: the heads square features (LayerNorm, "
                      "products), which near 1e19 passes float32's 3.4e38; rescale them (to unit norm, as CLIP's are)")
    return dataclasses.replace(fs, caption_image=fs.caption_image.astype(np.int32), provenance={
        "dataset": "npz", "file": os.path.basename(path), "sha256": sha256(path),
        "tokens": fs.image.ndim == 3 or fs.text.ndim == 3, "n_images": fs.n_images, "n_captions": fs.n_captions})
