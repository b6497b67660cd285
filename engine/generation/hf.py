"""The Hugging Face generation backend: ``transformers`` ``generate`` with a KV cache.

For machines without vLLM, and as the reference the vLLM backend is checked against. Logprobs come from
the raw logits (before temperature), as the trainer computes them. A call is seeded as a whole: the same
seed and prompts on the same number of workers give the same completions.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.generation.interfaces import Completion, SamplingParams
from engine.generation.sampling import sample_seed
from engine.models.loading import skip_sklearn_in_transformers
from engine.profiling import Profiled
from engine.weight_broadcast import RefitReceiver
from engine.weight_sync import WeightManifest, check_manifest, gather_checked, manifest_of


class HFGenerationWorker(Profiled, RefitReceiver):
    def __init__(self, model_path: str, dtype: str = "float32", threads: int = 1, **_: Any):
        skip_sklearn_in_transformers()
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # CUDA only where this worker reserved a GPU: an actor without one has the node's GPUs hidden
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()
        parameters = dict(self.model.named_parameters())
        self.expected = {spec.name: spec for spec in manifest_of(parameters)}
        self.aliases = set(self.model.state_dict()) - set(parameters)  # tied weights
        self.version = 0

    def _stops(self, params: SamplingParams) -> set[int]:
        return {self.tokenizer.eos_token_id, *params.stop_token_ids}

    def _cut(self, tokens: list[int], params: SamplingParams) -> tuple[int, str]:
        """Length of the completion (through its first stop token or stop string) and why it ended."""
        stops = self._stops(params)
        for position, token in enumerate(tokens):
            if token in stops:
                return position + 1, "stop"
            if params.stop and any(s in self.tokenizer.decode(tokens[: position + 1]) for s in params.stop):
                return position + 1, "stop"
        return len(tokens), "length"

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, first_index: int = 0
    ) -> list[list[Completion]]:
        """All (prompt, sample) rows in one left-padded ``generate`` call under one seeded RNG."""
        rows = [prompt for prompt in prompts for _ in range(params.n)]
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=self.device)
        attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=self.device)
        sampling = params.temperature > 0
        options: dict[str, Any] = dict(
            max_new_tokens=params.max_tokens,
            do_sample=sampling,
            eos_token_id=sorted(self._stops(params)),
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
        if sampling:
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        if params.stop:
            options.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(sample_seed(params.seed, first_index, 0))
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, **options)
        new_tokens = out.sequences[:, width:]
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
        token_logprobs = logprobs.gather(-1, new_tokens[:, :, None]).squeeze(-1)
        completions = []
        for row in range(len(rows)):
            tokens = new_tokens[row].tolist()
            length, finish = self._cut(tokens, params)
            completions.append(
                Completion(
                    tokens[:length],
                    token_logprobs[row, :length].tolist(),
                    finish,
                    self.tokenizer.decode(tokens[:length], skip_special_tokens=True),
                )
            )
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def update_weights(self, manifest: WeightManifest, buckets: list[Any], version: int) -> dict[str, float]:
        keep = check_manifest(manifest, self.expected, self.aliases)
        return self.load_weights(gather_checked(manifest, buckets, keep), version)

    def load_weights(self, named: list[tuple[str, torch.Tensor]], version: int) -> dict[str, float]:
        """Copy checked weights into the model's parameters."""
        with torch.no_grad():
            parameters = dict(self.model.named_parameters())
            for name, tensor in named:
                parameters[name].copy_(tensor.to(parameters[name].dtype))
        self.version = version
        return {"tensors": float(len(named))}

    def weight_version(self) -> int:
        return self.version

    def info(self) -> dict[str, Any]:
        import os
        import sys

        import transformers

        from engine.cluster import placement

        return {
            "backend": "hf",
            "python": sys.executable,
            "pid": os.getpid(),
            "transformers": transformers.__version__,
            **placement(),
        }
