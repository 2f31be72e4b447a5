"""A job runs each text through the model once for detection and all of its evaluation: generation
prefills see only prompts, and every full forward over prompt + text (a capture, or the perplexity pass of a
scheme whose capture is the ids alone) is a text never forwarded before, attacked texts included. Counted
with a forward hook on the model during a whole job."""

import pytest

import os


from composing import app_config
from moewm.app.job import run_job
from moewm.engine import capture
from moewm.app.services import get_model

os.environ.setdefault("MOEWM_SECRET_KEY", "one-forward-test-secret")


CASES = {
    # scheme and attack -> the fewest full forwards: watermarked, plain, greedy and top-p samples of 4 prompts and
    # 8 chunks of each of 3 human corpora for MoE-LSH (its captures); KGW forwards only for perplexity.
    "moe_tournament": ([], 4 * 4 + 3 * 8),  # the default scheme
    "moe_tournament_attack_suite": (["eval.attacks=[substitution:0.3,deletion:0.1]"], 4 * 4 + 3 * 8 + 1),
    "moe_lsh": (["watermark=moe_lsh"], 4 * 4 + 3 * 8),
    "moe_lsh_unchanged_by_attack": (["watermark=moe_lsh", "attack=substitution", "attack.strength=0"], 4 * 4 + 3 * 8),
    "moe_lsh_substitution": (["watermark=moe_lsh", "attack=substitution", "attack.strength=0.3"], 4 * 4 + 3 * 8 + 1),
    "moe_lsh_paraphrase": (["watermark=moe_lsh", "attack=paraphrase", "attack.paraphrase_max_new_tokens=24"], 4 * 4 + 3 * 8 + 1),
    # geometry and a centred encoder: calibration and the W1 distributions come from the plain texts' captures
    "moe_lsh_geometry_centered": (["watermark=moe_lsh", "eval.geometry=true", "encoder=centered", "eval.w1_contexts=8"], 4 * 4 + 3 * 8),
    "moe_lsh_attack_suite": (["watermark=moe_lsh", "eval.attacks=[substitution:0.3,deletion:0.1,copy_paste:0.5]"], 4 * 4 + 3 * 8 + 1),
    "none": (["watermark=none"], 3 * 4 + 3 * 8),  # plain generation scored by MoE-LSH: its "watermarked" texts are the plain ones
    "kgw_deletion": (["watermark=kgw", "attack=deletion", "attack.strength=0.2"], 2 * 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_job_forwards_each_text_once(case, tmp_path, monkeypatch):
    extra, fewest = CASES[case]
    monkeypatch.setenv("MOEWM_CACHE_DIR", str(tmp_path / "cache"))
    app = app_config(["data.num_prompts=4", "generation.max_new_tokens=24", "eval=minimal", "logger=none", "progress=false", *extra])
    model, _ = get_model(app)
    monkeypatch.setattr(capture, "_MEMORY", {})  # no captures of an earlier case in this process: all are counted
    monkeypatch.chdir(tmp_path)  # a fresh outputs/cache: null texts are captured here, not loaded from an earlier run
    full_rows: list[tuple[int, ...]] = []

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values")
        if ids is None or ids.shape[1] <= 1 or (past is not None and past.get_seq_length() > 0):
            return  # a decoding step of generate
        mask = kwargs.get("attention_mask")
        for row, m in zip(ids.tolist(), (mask.tolist() if mask is not None else [[1] * ids.shape[1]] * ids.shape[0])):
            full_rows.append(tuple(t for t, keep in zip(row, m) if keep))

    # The decoder: generation reaches it through model.forward, a capture calls it directly (then the head).
    handle = model.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    try:
        metrics = run_job(app, tmp_path / "job", run_name="one-forward", group=None)
    finally:
        handle.remove()
    if any(e.startswith(("attack=", "eval.attacks=")) for e in extra):  # the survival diagnostics came from these same captures
        assert any(k.startswith("survival_signature") and metrics[k] == metrics[k] for k in metrics), sorted(metrics)
    # Generation prefills forward the prompts (once per decoding: watermarked, plain, greedy, top-p; at most 8
    # tokens here), and the output-head check an 8-token probe. Every longer full forward is a capture of
    # prompt + text (24 new tokens, or a human-text chunk).
    captures = [r for r in full_rows if len(r) > 16]
    repeated = {r for r in captures if captures.count(r) > 1}
    assert len(captures) >= fewest, len(captures)
    assert not repeated, f"{len(repeated)} texts went through the model more than once"
