"""Probe (2026-11-28): each count, detail and presence question of an eval's test set asked once more in mode
macro with top_logprobs=10, joined to the eval's macro and auto (thresholds 1 / 1) scores and gate confidence.

    python probe_top.py EVAL_DIR OUT.json [URL]

URL defaults to http://127.0.0.1:8311 (`dualfocus serve --model tiny-dualfocus --port 8311`); EVAL_DIR comes from
`dualfocus eval --generate 400 --seed S --mode all --zoom-threshold 1 --zoom-threshold-choice 1 --out EVAL_DIR`.
"""

import asyncio
import base64
import json
import sys

import openai


def answers(eval_dir: str, mode: str) -> dict[int, dict]:
    return {a["question_id"]: a["metadata"] for a in map(json.loads, open(f"{eval_dir}/answers-{mode}.jsonl"))}


async def main(eval_dir: str, out: str, url: str) -> None:
    questions = [json.loads(line) for line in open(f"{eval_dir}/questions.jsonl")]
    macro, auto = answers(eval_dir, "macro"), answers(eval_dir, "auto")
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none")
    model = (await client.models.list()).data[0].id
    slots = asyncio.Semaphore(8)

    async def ask(q: dict) -> dict:
        image = base64.b64encode(open(f"{eval_dir}/images/{q['image']}", "rb").read()).decode()
        content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                   {"type": "text", "text": q["text"]}]
        async with slots:
            r = await client.chat.completions.create(
                model=model, max_tokens=8, temperature=0, logprobs=True, top_logprobs=10,
                messages=[{"role": "user", "content": content}], extra_body={"dualfocus": {"mode": "macro"}})
        qid = q["question_id"]
        return {"qid": qid, "kind": q["kind"], "answer": q["answer"], "macro": r.choices[0].message.content,
                "macro_score": macro[qid]["score"], "df_score": auto[qid]["score"],
                "conf": auto[qid]["gate"]["confidence"],
                "top": [{t.token: t.logprob for t in e.top_logprobs} for e in r.choices[0].logprobs.content]}

    rows = await asyncio.gather(*(ask(q) for q in questions if q["kind"] in ("count", "detail", "presence")))
    json.dump(rows, open(out, "w"))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "http://127.0.0.1:8311"))
