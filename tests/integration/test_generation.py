"""Generation workers on Ray: vLLM in its own venv and the HF backend, seeded sampling, live refit from
the FSDP2 trainer, logprob agreement, and refusal of bad weight pushes."""

import pytest
import ray
import torch

from engine.algorithms.metrics import logprob_agreement
from engine.algorithms.sft import sft_loss
from engine.config import GenerationConfig
from engine.data.chat import TokenizedExample, tokenize_prompt
from engine.generation.group import GenerationGroup
from engine.generation.interfaces import SamplingParams
from engine.weight_sync import load_saved_weights, refit
from tests.integration.test_fsdp2 import make_policy

SAMPLING = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=7)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenize_prompt(tokenizer, [{"role": "user", "content": f"What is {a}+{a + 7}?"}]) for a in range(10, 16)]


@pytest.fixture(scope="module")
def vllm_group(ray_local, tiny_model_dir):
    from engine import worker_envs

    try:
        worker_envs.python_for("vllm")
    except worker_envs.WorkerEnvMissing as missing:
        pytest.fail(str(missing), pytrace=False)  # a missing environment is a broken install, not a skip
    group = GenerationGroup(GenerationConfig(backend="vllm", threads_per_worker=2), tiny_model_dir)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def hf_group(ray_local, tiny_model_dir):
    group = GenerationGroup(GenerationConfig(backend="hf"), tiny_model_dir)
    yield group
    group.shutdown()


def completion_examples(prompts, completions) -> list[TokenizedExample]:
    """Each prompt with each of its completions, the completion's tokens the targets."""
    return [
        TokenizedExample(prompt + sample.token_ids, [0] * len(prompt) + [1] * len(sample.token_ids))
        for prompt, samples in zip(prompts, completions)
        for sample in samples
    ]


def trainer_vs_generator(policy, prompts, completions):
    """Trainer logprobs of the generated tokens next to the generator's, flattened in the same order."""
    examples = completion_examples(prompts, completions)
    generated = [lp for samples in completions for sample in samples for lp in sample.logprobs]
    trainer = torch.cat(policy.forward(examples))  # aligned to the input ids, as the loss masks are
    mask = torch.cat([torch.tensor(e.loss_mask) for e in examples]).bool()
    return trainer[mask], torch.tensor(generated)


def test_vllm_runs_in_its_own_environment(vllm_group):
    import prefect

    info = vllm_group.call("info")[0]
    assert info["vllm"] == "0.32.0" and "/envs/vllm-" in info["python"]
    assert info["threads"] == 2  # the config's, not the one thread Ray's OMP_NUM_THREADS gives the bundle
    assert prefect.__version__.startswith("3.9")  # the driver keeps the newest Prefect
    with pytest.raises(ImportError):
        import vllm  # noqa: F401


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_same_seed_same_completions(backend, request, prompts):
    group = request.getfixturevalue(f"{backend}_group")
    first, second = group.generate(prompts, SAMPLING), group.generate(prompts, SAMPLING)
    assert [[c.token_ids for c in s] for s in first] == [[c.token_ids for c in s] for s in second]
    assert all(len(s) == SAMPLING.n for s in first)
    other = group.generate(prompts, SAMPLING.model_copy(update={"seed": 8}))
    assert [[c.token_ids for c in s] for s in other] != [[c.token_ids for c in s] for s in first]
    greedy = group.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=6))[0][0]
    assert greedy.finish_reason in ("stop", "length") and len(greedy.token_ids) == len(greedy.logprobs)


@pytest.mark.parametrize("how", ["object_store", "collective"])
@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_refit_after_a_trainer_step_restores_logprob_agreement(
    backend, how, request, tiny_model_dir, prompts, tokenizer, monkeypatch
):
    from tests.integration.test_fsdp2 import BATCH

    group = request.getfixturevalue(f"{backend}_group")
    monkeypatch.setattr(group, "cfg", group.cfg.model_copy(update={"refit": how}))
    load_saved_weights(group, tiny_model_dir, version=0)  # the initial weights, whatever an earlier test pushed
    pad = tokenizer.pad_token_id
    policy = make_policy(tiny_model_dir, pad, world_size=2, token_budget=100_000)
    try:
        stale = group.generate(prompts, SAMPLING)
        trainer_lp, generator_lp = trainer_vs_generator(policy, prompts, stale)
        assert (trainer_lp - generator_lp).abs().max() < 1e-3  # same initial weights

        policy.train(completion_examples(prompts, stale)[:BATCH], sft_loss)
        trainer_lp, generator_lp = trainer_vs_generator(policy, prompts, stale)
        before = logprob_agreement(trainer_lp, generator_lp, torch.ones_like(trainer_lp))
        assert before["logprob_max_abs_diff"] > 1e-2  # the step moved the trainer: a refit is needed

        metrics = refit(policy, group, version=1)
        assert metrics["refit/bytes"] > 1e6 and metrics["refit/seconds"] > 0
        assert group.call("weight_version") == [1]
        assert (group.refit_sender is policy) == (how == "collective")  # the broadcast group was formed
        fresh = group.generate(prompts, SAMPLING)
        trainer_lp, generator_lp = trainer_vs_generator(policy, prompts, fresh)
        after = logprob_agreement(trainer_lp, generator_lp, torch.ones_like(trainer_lp))
        assert after["logprob_max_abs_diff"] < 1e-3
        assert after["token_mult_prob_error"] < 1.001
    finally:
        policy.shutdown()


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_bad_weight_push_is_refused_and_engine_keeps_serving(backend, request, tiny_model_dir, prompts):
    from safetensors.torch import load_file

    from engine.weight_sync import manifest_of

    group = request.getfixturevalue(f"{backend}_group")
    before = group.generate(prompts, SAMPLING)
    version = group.call("weight_version")[0]
    weights = load_file(tiny_model_dir / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"

    wrong_shape = dict(weights)
    wrong_shape[name] = torch.zeros(3, 3)
    with pytest.raises(ray.exceptions.RayTaskError, match=f"weight update for {name} has shape"):
        group.update_weights(manifest_of(wrong_shape), [list(wrong_shape.items())], version + 1)

    missing = {k: v for k, v in weights.items() if k != name}
    with pytest.raises(ray.exceptions.RayTaskError, match="weight update is missing tensors: " + name):
        group.update_weights(manifest_of(missing), [list(missing.items())], version + 1)
    # a broadcast refit announces its manifest first: the same refusals, before any tensor is sent
    with pytest.raises(ray.exceptions.RayTaskError, match=f"weight update for {name} has shape"):
        group.check_refit(manifest_of(wrong_shape))
    with pytest.raises(ray.exceptions.RayTaskError, match="weight update is missing tensors: " + name):
        group.check_refit(manifest_of(missing))

    lying = dict(weights)
    bucket = [(k, torch.zeros(2) if k == name else v) for k, v in lying.items()]
    with pytest.raises(ray.exceptions.RayTaskError, match="does not match the announced manifest"):
        group.update_weights(manifest_of(lying), [bucket], version + 1)

    assert group.call("weight_version") == [version]
    after = group.generate(prompts, SAMPLING)
    assert [[c.token_ids for c in s] for s in after] == [[c.token_ids for c in s] for s in before]


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_saved_weights_swapped_in_generate_like_a_fresh_engine(backend, request, tiny_model_dir, prompts, tmp_path):
    """The evaluator's one-engine path: another checkpoint's weights loaded into a running engine give the
    completions a fresh engine on that checkpoint gives, and the first model's come back when it is reloaded."""
    from engine.config import TinyModelConfig
    from engine.models.tiny import make_tiny_model

    other_dir = make_tiny_model(tmp_path / "other", TinyModelConfig(seed=1))
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=12, seed=0)
    group = request.getfixturevalue(f"{backend}_group")
    version = group.call("weight_version")[0]
    load_saved_weights(group, tiny_model_dir, version + 1)  # earlier tests may have refitted the engine
    original = group.generate(prompts, greedy)
    fresh = GenerationGroup(GenerationConfig(backend=backend), other_dir)
    try:
        expected = fresh.generate(prompts, greedy)
    finally:
        fresh.shutdown()

    def tokens(completions):
        return [[c.token_ids for c in s] for s in completions]

    assert tokens(expected) != tokens(original)  # the two checkpoints really differ
    load_saved_weights(group, other_dir, version + 2)
    assert tokens(group.generate(prompts, greedy)) == tokens(expected)
    load_saved_weights(group, tiny_model_dir, version + 3)
    assert tokens(group.generate(prompts, greedy)) == tokens(original)


def test_an_exported_bf16_model_loads_in_vllm(vllm_group, tiny_model_dir, prompts, tmp_path):
    """`posttrain export --dtype bf16` writes what vLLM loads: an engine started on the export generates, and its
    greedy answers are those of the committed model run in bf16 by the same engine code."""
    from engine.models.export import export_folder

    out = export_folder(tiny_model_dir, tmp_path / "exported", "bf16", {}, "grpo")
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=8, seed=0)
    exported = GenerationGroup(GenerationConfig(backend="vllm", dtype="bfloat16"), out)
    original = GenerationGroup(GenerationConfig(backend="vllm", dtype="bfloat16"), tiny_model_dir)
    try:
        got, want = exported.generate(prompts, greedy), original.generate(prompts, greedy)
    finally:
        exported.shutdown()
        original.shutdown()
    assert all(len(s[0].token_ids) > 0 for s in got)
    assert [s[0].token_ids for s in got] == [s[0].token_ids for s in want]


def test_lora_adapter_refit_keeps_vllm_on_the_trainers_logprobs(ray_local, tiny_model_dir, prompts, tokenizer):
    """generation.lora_refit=adapter: vLLM applies the pushed adapters to the base it loaded. After each training
    step and adapter refit (replaced in place, not served stale) the generator's logprobs are the trainer's; the
    push is a fraction of a merged one's bytes; a bad adapter push is refused and the engine keeps the last one."""
    from engine.config import LoraConfig, load_config
    from engine.policy.group import start_policy_group
    from engine.weight_sync import manifest_of
    from tests.integration.test_fsdp2 import BATCH

    lora = LoraConfig(rank=8, alpha=16.0)
    cfg = load_config(None, {"policy.world_size": 1, "sft.optimizer.warmup_steps": 0, "sft.optimizer.lr": 1e-2})
    policy = start_policy_group(cfg, tiny_model_dir, cfg.sft.optimizer, 10, tokenizer.pad_token_id, lora=lora)
    group = GenerationGroup(GenerationConfig(backend="vllm"), tiny_model_dir, adapters=lora)
    try:
        trainer_lp, generator_lp = trainer_vs_generator(policy, prompts, group.generate(prompts, SAMPLING))
        assert (trainer_lp - generator_lp).abs().max() < 1e-3  # adapters start at zero: the base model
        for version in (1, 2):
            samples = group.generate(prompts, SAMPLING)
            policy.train(completion_examples(prompts, samples)[:BATCH], sft_loss)
            trainer_lp, generator_lp = trainer_vs_generator(policy, prompts, samples)
            assert (trainer_lp - generator_lp).abs().max() > 1e-2  # the step moved the adapters
            metrics = refit(policy, group, version=version)
            fresh = group.generate(prompts, SAMPLING)
            trainer_lp, generator_lp = trainer_vs_generator(policy, prompts, fresh)
            after = logprob_agreement(trainer_lp, generator_lp, torch.ones_like(trainer_lp))
            assert after["logprob_max_abs_diff"] < 1e-3 and after["token_mult_prob_error"] < 1.001, after
        merged_bytes = policy.weight_buckets(1 << 30)[2]
        assert metrics["refit/bytes"] == 4 * policy.parameter_counts()["model/trainable_parameters"]
        assert metrics["refit/bytes"] < merged_bytes / 2

        manifest, buckets, _ = policy.weight_buckets(1 << 30, adapters_only=True)
        adapters = dict(ray.get(buckets[0]))
        name = next(n for n in adapters if n.endswith("q_proj.lora_A.weight"))
        wrong = {**adapters, name: torch.zeros(8, 3)}
        with pytest.raises(ray.exceptions.RayTaskError, match="adapter update for .*q_proj has shapes"):
            group.update_adapters(manifest_of(wrong), [list(wrong.items())], 3)
        unknown = {**adapters, name.replace("q_proj", "no_proj"): adapters[name]}
        with pytest.raises(ray.exceptions.RayTaskError, match="which the model does not have"):
            group.update_adapters(manifest_of(unknown), [list(unknown.items())], 3)
        assert group.call("weight_version") == [2]
        again = group.generate(prompts, SAMPLING)
        assert [[c.token_ids for c in s] for s in again] == [[c.token_ids for c in s] for s in fresh]
    finally:
        group.shutdown()
        policy.shutdown()
