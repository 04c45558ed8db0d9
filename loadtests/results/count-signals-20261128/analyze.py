"""The count questions' macro-pass signals by what zooming did to them: python analyze.py top-set0.json
../calibration-20261128-fp32/seed0 (the eval dir gives the box's share of the image, from the auto run)."""
import collections
import json
import math
import statistics as st
import sys

rows = [r for r in json.load(open(sys.argv[1])) if r["kind"] == "count"]
auto = {a["question_id"]: a for a in map(json.loads, open(f"{sys.argv[2]}/answers-auto.jsonl"))}
by = collections.defaultdict(list)
for r in rows:
    what = ("zoom corrects" if r["df_score"] > r["macro_score"] else "zoom breaks" if r["df_score"] < r["macro_score"]
            else "both right" if r["macro_score"] else "both wrong")
    p = {k: math.exp(v) for k, v in r["top"][0].items()}
    top = sorted(p.values(), reverse=True)
    by[what].append({"confidence": r["conf"], "margin": top[0] - top[1], "p(2)": p.get(" 2", 0.0),
                     "entropy": -sum(v * math.log(v) for v in p.values()),
                     "box area": auto[r["qid"]]["metadata"]["gate"]["box_area"]})
print("| count answers | n | " + " | ".join(next(iter(by.values()))[0]) + " |")
for what, xs in by.items():
    print(f"| {what} | {len(xs)} | " + " | ".join(
        f"{st.median(x[k] for x in xs if x[k] is not None):.2f}" for k in xs[0]) + " |")
