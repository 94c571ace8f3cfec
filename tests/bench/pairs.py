"""Paired confined/unconfined statistics (ratio of medians, median of per-pair ratios, bootstrap
95 % intervals) of `shoji bench boot|devices --peer unconfined --json` outputs:

    python3 tests/bench/pairs.py boot FILE.json...
    python3 tests/bench/pairs.py devices FILE.json...
"""
import json, random, statistics as st, sys
random.seed(1)

def ci(values, f, n=4000):
    b = sorted(f([random.choice(values) for _ in values]) for _ in range(n))
    return b[int(0.025 * n)], b[int(0.975 * n)]

def report(name, pairs):
    ratios = [a / b for a, b in pairs]
    conf = [a for a, _ in pairs]; unc = [b for _, b in pairs]
    med_ratio = st.median(conf) / st.median(unc)
    lo, hi = ci(pairs, lambda ps: st.median([a for a, _ in ps]) / st.median([b for _, b in ps]))
    pr = st.median(ratios); plo, phi = ci(ratios, st.median)
    print(f"{name}: n={len(pairs)} median {st.median(conf):.3f} / {st.median(unc):.3f} = {med_ratio:.4f} (95% CI {lo:.4f}-{hi:.4f}); "
          f"median paired ratio {pr:.4f} ({plo:.4f}-{phi:.4f})")

kind = sys.argv[1]
files = sys.argv[2:]
if kind == "boot":
    pairs = []
    for f in files:
        d = json.load(open(f))
        s = {x["name"]: x["samples_ms"] for x in d["systems"]}
        a, b = s["shoji"], s["shoji-unconfined"]
        pairs += list(zip(a, b))
    report("boot ms (all)", pairs)
    fast_a = [a for a, _ in pairs if a < 20]; fast_b = [b for _, b in pairs if b < 20]
    both = [(a, b) for a, b in pairs if a < 20 and b < 20]
    print(f"fast boots (<20 ms): {len(fast_a)} confined, {len(fast_b)} unconfined; medians {st.median(fast_a):.3f} / {st.median(fast_b):.3f} = {st.median(fast_a)/st.median(fast_b):.4f}")
    lo, hi = ci(list(range(len(pairs))), lambda idx: st.median([pairs[i][0] for i in idx if pairs[i][0] < 20] or [1]) / st.median([pairs[i][1] for i in idx if pairs[i][1] < 20] or [1]))
    print(f"  fast-mode ratio 95% CI {lo:.4f}-{hi:.4f}")
    if both:
        report("pairs where both were fast", both)
else:
    by = {}
    for f in files:
        d = json.load(open(f))
        runs = {}
        for r in d["runs"]:
            runs.setdefault(r["run"], {})[r["vmm"]] = r
        for run in runs.values():
            if len(run) != 2: continue
            names = sorted(run)
            conf = run[[n for n in names if "unconfined" not in n][0]]
            unc = run[[n for n in names if "unconfined" in n][0]]
            for pa, pb in zip(conf["phases"], unc["phases"]):
                for metric in ("mb_per_s", "iops", "cpu_us_per_request"):
                    if pa[metric] and pb[metric]:
                        by.setdefault((pa["name"], metric), []).append((pa[metric], pb[metric]))
    for (phase, metric), pairs in sorted(by.items()):
        report(f"{phase} {metric}", pairs)
