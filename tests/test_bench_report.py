"""make bench's bookkeeping: docs/benchmarks.md's sections, the ratios it reports, the compute shape's model."""

import json
from pathlib import Path

import pytest

from loadtests import bench
from loadtests.report import replace_section, section

ROOT = Path(__file__).resolve().parent.parent


def test_a_section_is_appended_then_replaced_in_place_and_the_rest_kept(tmp_path):
    doc = tmp_path / "b.md"
    replace_section(doc, "one", "## One\n\nfirst")
    replace_section(doc, "two", "## Two\n\nsecond\n")
    doc.write_text(doc.read_text() + "\nhand-written tail\n")
    replace_section(doc, "one", "## One\n\nrewritten")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\n<!-- one:start -->\n## One\n\nrewritten\n<!-- one:end -->\n")
    assert text.index("rewritten") < text.index("second") < text.index("hand-written tail")
    assert "first" not in text and text.count("<!-- one:start -->") == 1
    assert section(doc, "two") == "## Two\n\nsecond"
    assert section(doc, "three") is None


def test_a_section_without_its_end_marker_is_refused_not_truncated(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\n<!-- one:start -->\nold\n\nother text\n")
    with pytest.raises(ValueError, match="no <!-- one:end -->"):
        replace_section(doc, "one", "new")
    assert "other text" in doc.read_text()


def test_benchmarks_md_has_each_generated_section_once():
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    for name in ("bench-tiny", "bench-compute", "bigimages", "fleet"):
        assert text.count(f"<!-- {name}:start -->") == 1 and text.count(f"<!-- {name}:end -->") == 1, name
    assert "## Small streams beside big images" in section(doc, "bigimages")
    assert "## Many replicas behind vllm-router" in section(doc, "fleet")


def _summary(rps: float, p50: float, prompt: float = 0, computed: float = 0, stages: dict | None = None) -> dict:
    out = {"requests_per_s": rps, "latency_s": {"p50": p50}, "ok": 10, "prompt_tokens_per_request": prompt,
           "computed_prompt_tokens_per_request": computed}
    if stages is not None:
        out["stages"] = stages
    return out


def test_ratios_at_every_level_and_at_the_top_one():
    s = {
        "ours-dualfocus": {"1": _summary(2.0, 0.5, 5000, 1500), "4": _summary(4.0, 1.0, 5000, 1600)},
        "stock-dualfocus": {"1": _summary(1.0, 1.0), "4": _summary(1.6, 2.5)},
        "ours-macro": {"1": _summary(5.0, 0.2), "4": _summary(10.0, 0.4)},
        "stock-chat": {"1": _summary(5.0, 0.2), "4": _summary(8.0, 0.5)},
        "ours-auto": {"1": _summary(3.0, 0.3), "4": _summary(8.0, 0.5, stages={"micro": {"count": 3}})},
        "reference-hf": {"requests_per_s": 0.5, "latency_s": {"p50": 2.0}},
    }
    q = bench.ratios(s)
    assert q["top_level"] == "4"
    assert q["ours_vs_stock_dualfocus"] == {"1": {"throughput": 2.0, "p50": 0.5}, "4": {"throughput": 2.5, "p50": 0.4}}
    assert q["dualfocus_vs_macro"] == 0.4
    assert q["macro_vs_stock_chat"] == 1.25
    assert q["ours_vs_reference"] == 8.0
    assert q["computed_vs_no_sharing"] == 0.32
    assert q["auto_vs_macro"] == 0.8 and q["auto_vs_dualfocus"] == 2.0
    assert q["auto_zoom_share"] == 0.3  # from the micro stages when the summary has no gate counts
    s["ours-auto"]["4"]["zoom"] = {"zoomed": 1, "skipped": 3, "why": {}, "box_aborted": 2}
    assert bench.ratios(s)["auto_zoom_share"] == 0.25


def test_a_run_without_dualfocus_still_compares_the_modes_it_ran():
    # `bench --systems ours-auto,ours-macro`: auto's ratio to macro, nothing that needs dualfocus.
    s = {"ours-macro": {"4": _summary(10.0, 0.4)},
         "ours-auto": {"4": _summary(7.0, 0.5, stages={"micro": {"count": 3}})}}
    q = bench.ratios(s)
    assert q["top_level"] == "4" and q["auto_vs_macro"] == 0.7 and q["auto_zoom_share"] == 0.3
    assert q["dualfocus_vs_macro"] is None and q["ours_vs_reference"] is None and "computed_vs_no_sharing" not in q


def test_a_system_not_run_gives_no_ratio_and_the_report_says_why():
    s = {
        "ours-dualfocus": {"4": _summary(4.0, 1.0, 5000, 1600, {"box": {"count": 10, "ms_p50": 5.0,
                                                                         "cached_ratio": 0.0}})},
        "stock-dualfocus": {"4": _summary(1.6, 2.5)},
        "ours-macro": {"4": _summary(10.0, 0.4)},
        "stock-chat": {"4": _summary(8.0, 0.5)},
        "ours-auto": {"not_run": "the server refused mode auto: HTTP 400"},
        "reference-hf": {"requests_per_s": 0.5, "latency_s": {"p50": 2.0}, "requests": 3},
    }
    q = bench.ratios(s)
    assert q["auto_vs_macro"] is None and "auto_zoom_share" not in q
    failed = {**s, "stock-chat": {"4": {"requests_per_s": 0.0, "latency_s": {}, "ok": 0}}}  # every request failed
    assert bench.ratios(failed)["macro_vs_stock_chat"] is None
    results = {"command": "make bench", "git": "abc1234", "machine": {"platform": "Linux", "cpus": 2},
               "max_tokens": 16, "shapes": {"compute": {"model": "bench-llava-576", "levels": [4],
                                                        "lm_parameters": 98e6, "started": "now", "systems": s,
                                                        "ratios": q}}}
    text = bench.report(results, "compute", "loadtests/results/x.json", "benchmarks-compute.png")
    assert "ours-auto (mode auto): not run: the server refused mode auto: HTTP 400." in text
    assert "| (2) ours dualfocus / ours macro, throughput, c=4 | >= 0.5 | 0.40 (missed) |" in text
    assert "| (4) ours dualfocus (c=4) / reference sequential, throughput | >= 5x | 8.00x (met) |" in text
    assert "a 98 M-parameter language model" in text and "| box | 10 | 5.0 | - | - | 0.00 |" in text


def test_results_from_before_the_shapes_give_the_figures_published_then():
    old = json.loads((ROOT / "loadtests" / "results" / "bench-20261126-144917.json").read_text())
    q = bench.upgrade(old)["shapes"]["tiny"]["ratios"]
    # As docs/benchmarks.md published them from this file.
    assert round(q["ours_vs_stock_dualfocus"]["1"]["throughput"], 2) == 1.70
    assert round(q["dualfocus_vs_macro"], 2) == 0.41
    assert round(q["ours_vs_reference"], 1) == 3.3
    assert round(q["computed_vs_no_sharing"], 2) == 0.31


def test_unknown_shape_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "tiny,huge"])
    assert "--shapes" in capsys.readouterr().err


def test_the_compute_shape_model_has_llava_1_5_image_tokens_and_a_100m_class_language_model():
    import torch
    from transformers import LlavaForConditionalGeneration

    from engine.tiny import BENCH_LLAVA_TEXT, BENCH_MODELS, BUILT_MODELS, TINY_LLAVA_TEXT, TINY_MODELS, llava_parts

    assert bench.SHAPES["compute"].model in BENCH_MODELS and set(BENCH_MODELS) <= set(BUILT_MODELS)
    assert not set(BENCH_MODELS) & set(TINY_MODELS)  # never built by `make models` or the tests
    tokenizer, config = llava_parts(BENCH_LLAVA_TEXT)
    vision = config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == config.image_seq_length == 576
    assert config.text_config.hidden_size // config.text_config.num_attention_heads == 64
    with torch.device("meta"):  # the real module tree, no memory for its weights
        model = LlavaForConditionalGeneration(config)
    counted = sum(p.numel() for name, p in model.named_parameters()
                  if name.startswith(("model.language_model.", "lm_head.")))
    assert counted == BENCH_LLAVA_TEXT.parameters(len(tokenizer))
    assert 80e6 <= counted <= 300e6
    vision_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert vision_params < counted / 100  # the vision tower stays tiny: the language model is the work
    assert TINY_LLAVA_TEXT.parameters(len(tokenizer)) < 3e6


def test_stopping_a_server_ends_its_children_too(tmp_path):
    # As vLLM's engine core outlives a server that exits: a child that ignores SIGTERM.
    import subprocess
    import time

    pidfile = tmp_path / "child"
    script = f"(trap '' TERM; exec sleep 300) & echo $! > {pidfile}; wait"
    server = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    while not pidfile.exists() or not pidfile.read_text().strip():
        time.sleep(0.05)
    child = int(pidfile.read_text())
    bench.stop(server)
    assert server.returncode is not None

    def state() -> str:  # "" once reaped, "Z" while a dead child waits for init to reap it
        try:
            return (Path("/proc") / str(child) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return ""

    deadline = time.time() + 10
    while state() not in ("", "Z") and time.time() < deadline:
        time.sleep(0.05)
    assert state() in ("", "Z")


@pytest.mark.parametrize("n, share, zooming", [(10, 0.3, 3), (64, 0.27, 17), (4, 0.3, 1), (10, 0.0, 0), (10, 1.0, 10)])
def test_zoom_share_picks_that_share_of_requests_spread_out(n, share, zooming):
    picks = bench.zoom_picks(n, share)
    assert len(picks) == n and sum(picks) == zooming
    if zooming and zooming < n:  # spread: no two of them together when fewer than half zoom
        runs = "".join("x" if p else "." for p in picks).split(".")
        assert max(map(len, runs)) == 1 or zooming > n // 2
