"""The vLLM generation backend, run as a Ray actor inside its own venv (`posttrain env build vllm`).

The engine runs in the actor's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), fp32 by default so its
logprobs agree with the trainer's. Each (prompt, sample) pair is one request with its own seed (see
``sampling.sample_seed``), with chunked prefill off: seeded sampling with chunked prefill crashes the CPU
engine. Weights are replaced with vLLM's in-place reload path (``model.load_weights`` fails on CPU, where
weights are repacked after loading); a push is checked in full first, since a failed reload leaves the
engine broken. Requests skip vLLM's per-token detokenization unless stop strings need it (the texts are decoded
once, in a batch) and return flat logprobs of the sampled tokens alone.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.generation.interfaces import Completion, SamplingParams
from engine.generation.sampling import sample_seed
from engine.profiling import Profiled
from engine.weight_broadcast import RefitReceiver
from engine.weight_sync import TensorSpec, WeightManifest, check_adapter_manifest, check_manifest, gather_checked

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def checkpoint_manifest(model_dir: Path) -> dict[str, TensorSpec]:
    """Tensor names and shapes of a Hugging Face checkpoint, read from the safetensors headers only."""
    specs: dict[str, TensorSpec] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, meta in header.items():
            if name != "__metadata__":
                specs[name] = TensorSpec(name, tuple(meta["shape"]), _SAFETENSORS_DTYPES.get(meta["dtype"], "?"))
    return specs


ENGINE_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def _engine_lora_rank(rank: int) -> int:
    """The engine's adapter slot size: the smallest rank vLLM offers that holds ``rank``."""
    fitting = [size for size in ENGINE_LORA_RANKS if size >= rank]
    if not fitting:
        raise ValueError(f"vLLM serves LoRA adapters up to rank {ENGINE_LORA_RANKS[-1]}, not {rank}")
    return fitting[0]


def _refresh_tied_output_layer(worker: Any) -> None:
    """After an in-place reload, rebuild the tied output layer's CPU GEMM.

    On CPU, vLLM prepares each linear layer's GEMM (``cpu_linear``, possibly on a repacked copy) once
    its weights are loaded. The reload redoes that for the layers it loads, but the tied ``lm_head`` is
    not among them (its weights arrive as ``embed_tokens``), so it would keep computing logits from the
    old embedding (seen with vLLM 0.32). Re-tie it and prepare its GEMM again."""
    model = worker.model_runner.get_model()
    head, embedding = model.lm_head, model.model.embed_tokens.weight
    if head.weight is not embedding:
        head.weight = embedding
    head.quant_method.process_weights_after_loading(head)


def sampled_logprobs(flat: Any, tokens: list[int]) -> list[float]:
    """The sampled tokens' logprobs from vLLM's ``FlatLogprobs`` of a ``logprobs=0`` request, which holds the sampled
    token alone at each position (checked: a mismatch would train on another token's probability)."""
    if list(flat.token_ids) != tokens or list(flat.end_indices) != list(range(1, len(tokens) + 1)):
        raise RuntimeError("vLLM's logprobs do not line up with the sampled tokens (one sampled token per position)")
    return list(flat.logprobs)


class VLLMGenerationWorker(Profiled, RefitReceiver):
    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        max_model_len: int = 512,
        kv_cache_bytes: int = 1 << 30,
        seed: int = 0,
        threads: int = 1,
        lora_rank: int = 0,
        lora_alpha: float = 0.0,
        tensor_parallel_size: int = 1,
        **_: Any,
    ):
        from vllm import LLM

        # before the engine starts: vLLM's CPU worker keeps the thread count it finds, which in a Ray actor is the
        # bundle's OMP_NUM_THREADS (1 for a one-CPU bundle), not the config's
        torch.set_num_threads(threads)
        parallel = {}
        if tensor_parallel_size > 1:  # its shards run as processes inside this actor, on the GPUs of its bundle
            parallel = {"tensor_parallel_size": tensor_parallel_size, "distributed_executor_backend": "mp"}
        adapters = {}
        if lora_rank:  # one adapter slot, the policy's, replaced in place by every refit
            adapters = {"enable_lora": True, "max_lora_rank": _engine_lora_rank(lora_rank), "max_loras": 1}
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            enforce_eager=True,
            max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_bytes,
            enable_chunked_prefill=False,
            enable_prefix_caching=True,
            seed=seed,
            **parallel,
            **adapters,
        )
        self.model_path, self.lora_alpha = model_path, lora_alpha
        self.adapter = None  # the LoRARequest of the adapters last pushed; None: the base model alone
        self.adapter_dir = Path(tempfile.mkdtemp(prefix="posttrain-adapter-")) if lora_rank else None
        self.tokenizer = self.llm.get_tokenizer()
        self.expected = checkpoint_manifest(Path(model_path))
        config = json.loads((Path(model_path) / "config.json").read_text())
        self.aliases = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
        self.version = 0

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, first_index: int = 0
    ) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        detokenize = bool(params.stop)  # stop strings are matched on text; otherwise the texts are decoded once, below
        requests, sampling = [], []
        for i, prompt in enumerate(prompts):
            for j in range(params.n):
                requests.append(TokensPrompt(prompt_token_ids=prompt))
                sampling.append(
                    VLLMSamplingParams(
                        n=1,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        top_k=params.top_k or -1,
                        max_tokens=params.max_tokens,
                        stop=params.stop or None,
                        stop_token_ids=params.stop_token_ids or None,
                        include_stop_str_in_output=True,
                        seed=sample_seed(params.seed, first_index + i, j),
                        logprobs=0,
                        flat_logprobs=True,
                        detokenize=detokenize,
                    )
                )
        outputs = self.llm.generate(requests, sampling, use_tqdm=False, lora_request=self.adapter)
        samples = [output.outputs[0] for output in outputs]
        tokens = [list(sample.token_ids) for sample in samples]
        if detokenize:
            texts = [sample.text for sample in samples]
        else:
            texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        completions = []
        for sample, sampled, text in zip(samples, tokens, texts):
            finish = "length" if sample.finish_reason == "length" else "stop"
            completions.append(Completion(sampled, sampled_logprobs(sample.logprobs, sampled), finish, text))
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def update_weights(self, manifest: WeightManifest, buckets: list[Any], version: int) -> dict[str, float]:
        keep = check_manifest(manifest, self.expected, self.aliases)
        return self.load_weights(gather_checked(manifest, buckets, keep), version)

    def load_weights(self, named: list[tuple[str, torch.Tensor]], version: int) -> dict[str, float]:
        """Reload checked weights into the engine in place."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
        if self.aliases:
            self.llm.collective_rpc(_refresh_tied_output_layer)
        self.llm.reset_prefix_cache()
        self.version = version
        return {"tensors": float(len(named))}

    def update_adapters(self, manifest: WeightManifest, buckets: list[Any], version: int) -> dict[str, float]:
        """Apply the trainer's LoRA adapters to the base model (checked against its weights first): written as a
        peft folder and loaded into the engine's one adapter slot in place."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self.adapter_dir is None:
            raise ValueError("this engine was started without LoRA adapters (lora_rank=0)")
        rank, modules = check_adapter_manifest(manifest, self.expected)
        named = gather_checked(manifest, buckets, [spec.name for spec in manifest])
        folder = self.adapter_dir / f"v{version}"
        folder.mkdir()
        save_file({name: tensor.contiguous() for name, tensor in named}, str(folder / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.model_path,
            "r": rank,
            "lora_alpha": self.lora_alpha,
            "target_modules": modules,
            "bias": "none",
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        adapter = LoRARequest("policy", 1, str(folder), load_inplace=True)
        self.llm.llm_engine.add_lora(adapter)
        self.llm.reset_prefix_cache()  # cached prefixes were computed under the previous adapters
        if self.adapter is not None:
            shutil.rmtree(self.adapter.lora_path, ignore_errors=True)
        self.adapter, self.version = adapter, version
        return {"tensors": float(len(named))}

    def weight_version(self) -> int:
        return self.version

    def info(self) -> dict[str, Any]:
        import os
        import sys

        import vllm

        from engine.cluster import placement

        return {
            "backend": "vllm",
            "python": sys.executable,
            "pid": os.getpid(),
            "vllm": vllm.__version__,
            **placement(),
        }
