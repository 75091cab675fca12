"""Flickr8k as an ImageCaptionDataset, from the classic local folder or from the Hugging Face hub.

Folder layout: `root/Flicker8k_Dataset/*.jpg` (or `root/Flickr8k_Dataset/`) and
`root/Flickr8k.token.txt` with lines `<image>.jpg#<k>\\t<caption>`. The token file's known quirks
(captions of images absent from the folder, `.jpg.1` lines, CRLF, blank and malformed lines) are
skipped and counted in Flickr8kStats, logged in one summary line; lines that repeat an earlier
`<image>#<k>` and lines with bytes that are not UTF-8 are kept, and counted in it too. Images are
not decoded at load time; load_image raises BadImageError for an unreadable one. The official split files
(`Flickr_8k.trainImages.txt` etc.) are ignored: the study draws its own splits.
Hub: offline users set HF_HUB_OFFLINE=1 (and HF_DATASETS_OFFLINE=1) so that a hub id fails at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import socket
import urllib.parse
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from fusion_jax.data.dataset import (STANDIN_FILE, STANDIN_NAME, BadImageError, DataUnavailableError,
                                     ImageCaptionDataset)
from fusion_jax.files import atomic_write_json, atomic_write_text

logger = logging.getLogger("fusion_jax")

IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
TOKEN_FILE = "Flickr8k.token.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of such bytes
HOW_TO_PROVIDE = ("Provide Flickr8k either with --config.data.flickr8k_dir=DIR, DIR holding "
                  f"{IMAGE_DIRS[0]}/ (or {IMAGE_DIRS[1]}/) and {TOKEN_FILE}, or with "
                  "--config.data.hub_id=REPO with the Hugging Face hub reachable "
                  "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset).")
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Flickr8kStats:
    """What the folder loader kept and skipped, so that data loss is visible rather than silent."""

    n_images: int
    n_captions: int
    missing_image_captions: int  # captions of images absent from the image folder
    missing_images: int  # distinct image names those captions refer to
    jpg1_lines: int  # lines naming `<image>.jpg.1`
    malformed_lines: int  # no tab, no `#k`, a non-integer k or an empty caption
    uncaptioned_images: int  # image files with no caption, left out
    repeated_keys: int = 0  # kept lines whose `<image>#<k>` an earlier kept line has
    undecodable_lines: int = 0  # kept lines with bytes that are not UTF-8 (read as U+FFFD)

    def summary(self) -> str:
        """One log line with every count (the kept oddities only where there are some)."""
        kept = [f"{n} {what}" for n, what in ((self.repeated_keys, "lines repeating an earlier <image>#<k>"),
                                               (self.undecodable_lines, "lines with bytes that are not UTF-8"))
                if n]
        return (f"flickr8k: {self.n_images} images, {self.n_captions} captions; skipped "
                f"{self.missing_image_captions} captions of {self.missing_images} missing images, "
                f"{self.jpg1_lines} '.jpg.1' lines, {self.malformed_lines} malformed, "
                f"{self.uncaptioned_images} uncaptioned images" + (f"; kept {', '.join(kept)}" if kept else ""))

    def odd(self) -> bool:
        """Whether anything was skipped or kept with a quirk: the summary is then a warning."""
        return any((self.missing_image_captions, self.jpg1_lines, self.malformed_lines, self.uncaptioned_images,
                    self.repeated_keys, self.undecodable_lines))


def _unavailable(what: str) -> DataUnavailableError:
    """DataUnavailableError naming what is missing and both ways to provide the data."""
    return DataUnavailableError(f"Flickr8k unavailable: {what}. {HOW_TO_PROVIDE}")


def _decode(path: str, open_image: Callable[[], Any]) -> np.ndarray:
    """uint8 [H, W, 3] RGB of the image `open_image` returns. A file that cannot be decoded becomes
    BadImageError (dropped, and remembered as such by the feature cache); one the system cannot read
    (an OSError with an errno: permissions, a file gone, a network file system's I/O error) stops the
    run, since mending it must not leave the image dropped for good."""
    try:
        image = open_image()
        if image is None:
            raise ValueError("no image")
        with image:
            if image.mode.startswith(("I", "F")):  # Pillow's RGB conversion clips these to 255, not scales
                raise ValueError(f"pixels of mode {image.mode} (16-bit, 32-bit or float), not 8-bit")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except _DECODE_ERRORS as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise DataUnavailableError(f"cannot read image {path}: {e.strerror or e}; mend that (it is not "
                                       "dropped as unreadable), then run the same command again") from e
        raise BadImageError(f"{path}: {type(e).__name__}: {e}") from e


def _parse_line(line: str) -> tuple[str, int, str] | None:
    """(image name, k, caption) of a token line, or None if it is malformed."""
    key, tab, caption = line.partition("\t")
    name, hash_, k = key.strip().rpartition("#")
    caption = caption.strip()
    if not tab or not hash_ or not name or not caption:
        return None
    try:
        return name, int(k), caption
    except ValueError:
        return None


def _nested_hint(image_dir: str, files: dict) -> str:
    """A hint where the image folder holds no images but a folder inside it does (an archive unpacked
    one level too deep, as `Flickr8k_Dataset/Flicker8k_Dataset/`); '' otherwise."""
    if files:
        return ""
    def has_images(folder: str) -> bool:
        try:
            return any(n.lower().endswith(IMAGE_SUFFIXES) for n in os.listdir(folder))
        except OSError:  # unreadable: no hint from it
            return False

    with os.scandir(image_dir) as entries:
        inner = sorted(e.path for e in entries if e.is_dir() and has_images(e.path))
    return (f"; the images seem to be one folder deeper, in {inner[0]!r}: move its contents up into "
            f"{image_dir!r}" if inner else "")


def load_flickr8k_folder_with_stats(root: str) -> tuple[ImageCaptionDataset, Flickr8kStats]:
    """Flickr8k from its classic local layout under `root`, with the counts of what was skipped."""
    if not root or not os.path.isdir(root):
        raise _unavailable(f"directory {root!r} " + ("is a file, not a folder" if root and os.path.exists(root)
                                                      else "does not exist"))
    image_dir = next((os.path.join(root, d) for d in IMAGE_DIRS if os.path.isdir(os.path.join(root, d))), None)
    if image_dir is None:
        raise _unavailable(f"no image folder {IMAGE_DIRS[0]}/ or {IMAGE_DIRS[1]}/ in {root!r}")
    token_path = os.path.join(root, TOKEN_FILE)
    if not os.path.isfile(token_path):
        raise _unavailable(f"no caption file {TOKEN_FILE} in {root!r}")

    with os.scandir(image_dir) as entries:
        files = {e.name: e.stat().st_size for e in entries
                 if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES)}
    with open(token_path, "rb") as f:
        token_bytes = f.read()

    rows: list[tuple[str, int, int, str]] = []  # (image name, k, line number, caption)
    missing: set[str] = set()
    missing_captions = jpg1 = malformed = undecodable = 0
    # Bytes that are not UTF-8 become lone surrogates here (a valid U+FFFD in a caption stays itself), and
    # U+FFFD in the caption, as errors="replace" would read them.
    for number, line in enumerate(token_bytes.decode("utf-8-sig", errors="surrogateescape").splitlines()):
        if not line.strip():
            continue
        bad_bytes = _NOT_UTF8.search(line) is not None
        if bad_bytes:
            line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        parsed = _parse_line(line)
        if parsed is None:
            malformed += 1
        elif parsed[0].endswith(".jpg.1"):
            jpg1 += 1
        elif parsed[0] not in files:
            missing_captions += 1
            missing.add(parsed[0])
        else:
            rows.append((parsed[0], parsed[1], number, parsed[2]))
            undecodable += bad_bytes

    image_ids = tuple(sorted({r[0] for r in rows}))
    index = {name: i for i, name in enumerate(image_ids)}
    rows.sort(key=lambda r: (index[r[0]], r[1], r[2]))
    stats = Flickr8kStats(len(image_ids), len(rows), missing_captions, len(missing), jpg1, malformed,
                          len(files) - len(image_ids), len(rows) - len({r[:2] for r in rows}), undecodable)
    logger.log(logging.WARNING if stats.odd() else logging.INFO, stats.summary())
    if len(image_ids) < 2:
        raise _unavailable(f"{root!r} has {len(image_ids)} images with captions ({stats.summary()})"
                           + _nested_hint(image_dir, files))

    digest = hashlib.sha256(token_bytes)
    for name in image_ids:
        digest.update(f"\0{name}\0{files[name]}".encode())
    paths = tuple(os.path.join(image_dir, name) for name in image_ids)

    def load_image(i: int) -> np.ndarray:
        """Decode image i from disk (not cached: the feature extractor reads each image once)."""
        return _decode(paths[i], lambda: Image.open(paths[i]))

    standin = os.path.exists(os.path.join(root, STANDIN_FILE))
    if standin:
        logger.warning("%s is a stand-in written by fusion_jax (%s), not Flickr8k: its features and results are "
                       "labelled %r", root, STANDIN_FILE, STANDIN_NAME)
    dataset = ImageCaptionDataset(
        name=STANDIN_NAME if standin else "flickr8k", image_ids=image_ids, captions=tuple(r[3] for r in rows),
        caption_image=np.array([index[r[0]] for r in rows], dtype=np.int32),
        load_image=load_image, fingerprint=digest.hexdigest())
    return dataset, stats


def load_flickr8k_folder(root: str) -> ImageCaptionDataset:
    """Flickr8k from its classic local layout under `root` (see load_flickr8k_folder_with_stats)."""
    return load_flickr8k_folder_with_stats(root)[0]


def write_flickr8k_folder(ds: ImageCaptionDataset, root: str, size: tuple[int, int] = (500, 375),
                          quality: int = 90) -> str:
    """Write `ds` in Flickr8k's classic layout under `root`: STANDIN_FILE first (it marks the folder
    as a stand-in: the loader names it STANDIN_NAME, not flickr8k), each image resized to `size`
    (w, h) as `<image id>.jpg`, then the token file. For features.standins; returns root.

    Refuses a folder that holds a token file or an image folder but no marker (real Flickr8k, say).
    A marked folder's images are replaced, so a smaller rewrite leaves no stale ones."""
    from tqdm.auto import tqdm

    held = [name for name in (TOKEN_FILE, *IMAGE_DIRS) if os.path.exists(os.path.join(root, name))]
    if held and not os.path.exists(os.path.join(root, STANDIN_FILE)):
        raise FileExistsError(f"{root!r} holds {', '.join(held)} but no {STANDIN_FILE}: it looks like real data, "
                              "which a stand-in must not overwrite; choose another folder")
    os.makedirs(root, exist_ok=True)
    atomic_write_json(os.path.join(root, STANDIN_FILE),
                      {"written_by": "fusion_jax.data.flickr8k.write_flickr8k_folder", "not": "Flickr8k",
                       "dataset": ds.name, "fingerprint": ds.fingerprint, "n_images": ds.n_images})
    folder = os.path.join(root, IMAGE_DIRS[0])
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for i in tqdm(range(ds.n_images), desc="writing images", unit="image", leave=False):
        image = Image.fromarray(ds.load_image(i)).resize(size, Image.Resampling.BILINEAR)
        image.save(os.path.join(folder, f"{ds.image_ids[i]}.jpg"), quality=quality)
    k = np.zeros(ds.n_images, np.int64)
    lines = []
    for caption, i in zip(ds.captions, ds.caption_image):
        lines.append(f"{ds.image_ids[i]}.jpg#{k[i]}\t{caption}")
        k[i] += 1
    atomic_write_text(os.path.join(root, TOKEN_FILE), "\n".join(lines) + "\n")
    return root


def _caption_lists(ds: Any) -> list[list[str]]:
    """Per-row caption lists from `caption_0..caption_N` columns or a `captions`/`caption` column."""
    columns = list(ds.column_names)
    numbered = sorted((c for c in columns if c.startswith("caption_") and c[8:].isdigit()), key=lambda c: int(c[8:]))
    listed = next((c for c in ("captions", "caption") if c in columns), None)
    if "image" not in columns or not (numbered or listed):
        raise DataUnavailableError(
            f"Flickr8k hub dataset has columns {columns}; expected 'image' and either caption_0..caption_4 "
            f"or a 'captions'/'caption' list column. {HOW_TO_PROVIDE}")
    table = ds.select_columns(numbered or [listed]).to_dict()
    if numbered:
        per_row = [list(row) for row in zip(*(table[c] for c in numbered))]
    else:
        per_row = [[value] if isinstance(value, str) else list(value or []) for value in table[listed]]
    return [[c.strip() for c in row if isinstance(c, str) and c.strip()] for row in per_row]


def flickr8k_from_hf_dataset(ds: Any, source: str) -> ImageCaptionDataset:
    """ImageCaptionDataset of an in-memory `datasets.Dataset` of Flickr8k rows (one row per image)."""
    per_row = _caption_lists(ds)
    name_column = next((c for c in ("image_filename", "filename") if c in ds.column_names), None)
    names = ds.select_columns([name_column]).to_dict()[name_column] if name_column else None
    image_ids = tuple(str(names[i]) if names else f"{i:05d}" for i in range(len(per_row)))
    images = ds.select_columns(["image"])

    def load_image(i: int) -> np.ndarray:
        """Decode row i's image column."""
        return _decode(f"{source}[{i}]", lambda: images[i]["image"])

    digest = hashlib.sha256(f"{source}\0{getattr(ds, '_fingerprint', '')}".encode())
    return ImageCaptionDataset(
        name="flickr8k", image_ids=image_ids, captions=tuple(c for row in per_row for c in row),
        caption_image=np.array([i for i, row in enumerate(per_row) for _ in row], dtype=np.int32),
        load_image=load_image, fingerprint=digest.hexdigest())


HUB_SPLIT_ORDER = ("train", "validation", "test")


def load_flickr8k_hub(hub_id: str, revision: str | None = None) -> ImageCaptionDataset:
    """Flickr8k from a Hugging Face hub dataset (or a local dataset folder) via datasets.load_dataset: every
    split the dataset has, joined (train, validation, test, then any others by name), since the study
    builds its own pairs and split from all of Flickr8k's images, as the folder loader reads them."""
    import datasets
    from huggingface_hub.errors import HFValidationError

    try:
        splits = datasets.load_dataset(hub_id, revision=revision)
    except (OSError, datasets.exceptions.DatasetsError, HFValidationError) as e:
        offline = (", with HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set, from the datasets cache"
                   if hub_offline() and not os.path.isdir(hub_id) else "")
        raise _unavailable(f"cannot load hub dataset {hub_id!r} (revision {revision or 'newest'}){offline}: "
                           f"{type(e).__name__}: {e}") from e
    names = [n for n in HUB_SPLIT_ORDER if n in splits] + sorted(set(splits) - set(HUB_SPLIT_ORDER))
    ds = datasets.concatenate_datasets([splits[n] for n in names]) if len(names) > 1 else splits[names[0]]
    source = (f"{hub_id}@{revision}" if revision else hub_id) + ":" + "+".join(names)
    dataset = flickr8k_from_hf_dataset(ds, source)
    logger.info("flickr8k: %d images, %d captions from hub dataset %s (splits %s)", dataset.n_images,
                dataset.n_captions, source, ", ".join(f"{n} {len(splits[n])}" for n in names))
    return dataset


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE asks the Hugging Face libraries not to connect."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds.

    Without it a missing network shows up only after the hub clients' long retries."""
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout):
            return True
    except OSError:
        return False


def load_flickr8k(flickr8k_dir: str, hub_id: str, revision: str | None = None) -> ImageCaptionDataset:
    """Flickr8k from the folder if `flickr8k_dir` is set, else from the hub if `hub_id` is set."""
    if flickr8k_dir:
        return load_flickr8k_folder(flickr8k_dir)
    if hub_id:  # offline, only a copy in the datasets cache loads (datasets looks there alone)
        if not os.path.isdir(hub_id) and not hub_offline() and not hub_reachable():
            raise _unavailable(f"hub dataset {hub_id!r} requested but the Hugging Face hub cannot be reached (with "
                               "HF_HUB_OFFLINE=1 a copy in the datasets cache loads)")
        return load_flickr8k_hub(hub_id, revision)
    raise _unavailable("neither flickr8k_dir nor hub_id is configured")
