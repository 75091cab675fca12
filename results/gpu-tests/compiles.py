"""Where a run's compilation time goes, from its JAX_LOG_COMPILES log: XLA compilation seconds summed by
program name (the eager ops that `on_host` moves show as their primitive's name), and the wall-clock span of
the log. Usage: python results/gpu-tests/compiles.py LOG [TOP] (LOG may be gzipped: name.gz)"""
import collections
import datetime
import gzip
import re
import sys

stamp = re.compile(r"^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+)")
done = re.compile(r"Finished XLA compilation of (\S+) in ([\d.e-]+) sec")
seconds, count, times = collections.Counter(), collections.Counter(), []
opener = gzip.open if sys.argv[1].endswith(".gz") else open
for line in opener(sys.argv[1], "rt", errors="replace"):
    if m := stamp.match(line):
        t = datetime.datetime.strptime(m[2], "%H:%M:%S.%f")
        while times and t < times[-1] - datetime.timedelta(hours=12):  # past midnight
            t += datetime.timedelta(days=1)
        times.append(t)
    if m := done.search(line):
        seconds[m[1]] += float(m[2])
        count[m[1]] += 1
total = sum(seconds.values())
span = (times[-1] - times[0]).total_seconds() if times else 0.0
print(f"{sum(count.values())} XLA compilations, {total:.1f} s in all, over a logged span of {span:.1f} s")
print(f"{'program':<60} {'count':>5} {'seconds':>8}")
for name, s in seconds.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 25):
    print(f"{name[:60]:<60} {count[name]:>5} {s:>8.2f}")
