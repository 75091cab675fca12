"""probe.py with groups.GPU_COMPILER_OPTIONS emptied when NOGPUOPT=1 (A/B in one device call)."""
import os, runpy, sys
import fusion_jax.groups as G
if os.environ.get("NOGPUOPT"):
    G.GPU_COMPILER_OPTIONS = {}
    print("GPU_COMPILER_OPTIONS emptied", flush=True)
else:
    print("GPU_COMPILER_OPTIONS", G.GPU_COMPILER_OPTIONS, flush=True)
sys.argv = ["probe.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.path.dirname(__file__), "probe.py"), run_name="__main__")
