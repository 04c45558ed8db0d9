"""The embedded tiny checkpoints: deterministic, self-healing, in the real layouts."""

import json
import subprocess
import sys

from engine.tiny import TINY_MODELS, ensure_tiny


def test_build_is_deterministic_and_rebuilds_when_corrupt(tmp_path):
    a = ensure_tiny("tiny-llava", tmp_path / "a")
    b = ensure_tiny("tiny-llava", tmp_path / "b")
    manifest = json.loads((a / "dualfocus-tiny.json").read_text())
    assert manifest == json.loads((b / "dualfocus-tiny.json").read_text())

    weights = a / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download, say
    assert ensure_tiny("tiny-llava", tmp_path / "a") == a
    assert json.loads((a / "dualfocus-tiny.json").read_text()) == manifest


def test_llava_checkpoint_has_the_llava_1_5_shape(tiny_llava_path):
    config = json.loads((tiny_llava_path / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    vision = config["vision_config"]
    assert (vision["image_size"] // vision["patch_size"]) ** 2 == 576
    text = config["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] == 64  # a head size the CPU attention accepts
    from safetensors import safe_open

    with safe_open(tiny_llava_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    # The classic llava-hf names vLLM loads.
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "language_model.lm_head.weight" in keys


def test_cli_prints_one_line_per_checkpoint(tmp_path):
    env = {"DUALFOCUS_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "clients", "build-tiny"], env=env, capture_output=True,
                         text=True, check=True).stdout
    lines = [line.split(" ") for line in out.strip().splitlines()]
    assert [name for name, _ in lines] == list(TINY_MODELS)
    for name, path in lines:
        assert path == str(tmp_path / "models" / name)
        config = json.loads((tmp_path / "models" / name / "config.json").read_text())
        assert config["model_type"] in ("llava", "qwen2_vl", "qwen2_5_vl")


def test_processes_building_at_once_both_get_the_checkpoint(tmp_path):
    # Replicas of a fleet start together on an empty cache: one builds, the other waits for it.
    import os

    env = {**os.environ, "DUALFOCUS_CACHE": str(tmp_path)}
    code = "from engine.tiny import ensure_tiny; print(ensure_tiny('tiny-llava'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(tmp_path / "models" / "tiny-llava")] * 2
    manifest = json.loads((tmp_path / "models" / "tiny-llava" / "dualfocus-tiny.json").read_text())
    assert manifest["files"] and ensure_tiny("tiny-llava", tmp_path / "models") == tmp_path / "models" / "tiny-llava"
