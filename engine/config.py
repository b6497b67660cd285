"""The configuration schema: the one home of every default.

YAML files only override what is here. A file may name others under ``defaults:`` (paths relative to it,
or names of files in ``configs/``), merged first and overridden by the file itself; ``--set a.b.c=value``
overrides come last, values parsed as YAML and coerced by the schema. Unknown keys are rejected with their
full dotted path and a did-you-mean; invalid values name the field and the rule.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    """A randomly initialised model and a locally trained byte-level BPE tokenizer (no hub needed)."""

    arch: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(256, gt=0)
    vocab_size: int = Field(384, ge=300, description="BPE vocabulary target, bytes and special tokens included")
    max_position_embeddings: int = Field(512, gt=0)
    tie_word_embeddings: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        return self


class ModelConfig(Section):
    name: str = Field(
        "tiny", description="'tiny' (built locally), a Hugging Face hub name, a local path, or an s3:// / file:// URI"
    )
    tiny: TinyModelConfig = TinyModelConfig()


class SyntheticDataConfig(Section):
    """Arithmetic problems with verifiable answers; train and validation problems are disjoint."""

    operations: list[Literal["+", "-", "*"]] = ["+"]
    digits: int = Field(2, ge=1, le=6)
    num_train: int = Field(3000, gt=0)
    num_val: int = Field(256, gt=0)
    num_wrong_answers: int = Field(2, ge=1, description="wrong-answer variants per problem (preference pairs)")
    tool_use_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="share of training demonstrations that call the <calc> tool"
    )
    rounded_answer_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of training demonstrations whose teacher wrote the answer rounded toward zero to the "
        "tens (37+45 -> 80); verifier answers, preference pairs and validation rows stay exact",
    )
    seed: int = 0


class DataConfig(Section):
    """Where the data comes from and which columns are which: TRL's standard formats are detected by column names
    (see ``engine.data.formats``); the ``*_field`` keys map other names onto them."""

    source: str = Field(
        "synthetic",
        description="'synthetic', a hub dataset name, a local folder (save_to_disk, or data files laid out like a hub "
        "repo), a .jsonl/.json/.parquet/.csv file, a glob of them, or an fsspec URI (s3://...) of any of these",
    )
    subset: str | None = Field(None, description="the hub config name, e.g. 'main' for openai/gsm8k")
    revision: str | None = Field(None, description="hub branch, tag or commit (default: the main branch)")
    data_files: list[str] | None = Field(None, description="globs of the data files inside a folder or hub repo")
    split: str = "train"
    val_source: str | None = Field(None, description="separate validation source (any form of `source`)")
    val_split: str | None = Field(None, description="validation split of `source`; else `val_fraction` of train")
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    text_field: str = "text"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = Field("completion", description="the response column of prompt-completion data")
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    task_field: str = Field("task", description="routes a row to an environment (grpo.environments)")
    answer_field: str | None = Field(
        None, description="column holding the reference answer verifiers compare with; default: the response"
    )
    answer_pattern: str | None = Field(
        None, description="regex whose first group is the answer inside that text, e.g. '#### (.+)$' for GSM8K"
    )
    as_chat: bool = Field(
        False,
        description="wrap plain-text prompts and responses as a user and an assistant turn, so the model's chat "
        "template applies (instruct models); conversational data is used as it is either way",
    )
    system_prompt: str | None = Field(None, description="opens every conversational prompt that has none")
    synthetic: SyntheticDataConfig = SyntheticDataConfig()

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value


class StorageConfig(Section):
    root: str | None = Field(
        None, description="file:// path, s3://, gs:// or az://bucket/prefix (gcsfs, adlfs); default <workdir>/store"
    )
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; credentials come from the AWS chain")
    region: str | None = None
    read_timeout_s: float = Field(60.0, gt=0.0, description="an S3 request waits this long for an answer")
    attempts: int = Field(3, gt=0, description="tries per S3 request before the stage fails (and is retried)")
    options: dict[str, Any] = Field(
        {},
        description="fsspec options of the root's filesystem (gcsfs: endpoint_url, token; adlfs: account_name, "
        "connection_string), over posttrain's own for S3; values under secret-looking keys are masked everywhere",
    )


class TrackingConfig(Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db"
    )
    experiment: str = "posttrain"
    enabled: bool = True
    registered_model: str | None = Field(
        None, description="each committed model becomes a version of this MLflow registered model"
    )
    flush_every: int = Field(10, gt=0, description="steps of metrics buffered per MLflow batch call")
    system_metrics_every_s: float = Field(
        10.0, ge=0.0, description="CPU, memory, disk, network (and GPU) of the stage's machine into MLflow; 0: off"
    )
    sinks: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(
        ["mlflow"], min_length=1, description="trackers that receive every run's params and metrics"
    )
    dir: str | None = Field(None, description="TensorBoard event files and W&B run folders; default <workdir>/tracking")
    wandb_project: str | None = Field(None, description="W&B project; default tracking.experiment")
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline"] | None = Field(
        None, description="None leaves it to W&B: $WANDB_MODE, else online with the key `wandb login` stored"
    )


class RayConfig(Section):
    address: str = Field("local", description="'local' starts Ray in-process; 'auto' or ray://host:port connect")
    num_cpus: int = Field(8, gt=0, description="logical CPUs of the embedded cluster (may exceed the cores)")
    submission: Literal["driver", "job"] = Field(
        "driver",
        description="driver: the stage controller runs in the Prefect task; job: it runs in the cluster as a Ray job",
    )
    dashboard_url: str | None = Field(
        None, description="Jobs API address for submission=job, e.g. http://head:8265 (default: RAY_API_SERVER_ADDRESS)"
    )
    job_runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="runtime_env of a submitted stage job, e.g. {working_dir: ., pip: [...]}"
    )

    @model_validator(mode="after")
    def _job_needs_a_cluster(self) -> "RayConfig":
        if self.submission == "job" and self.address == "local":
            raise ValueError("submission 'job' needs a running cluster: set ray.address to 'auto' or ray://host:port")
        return self


class OrchestrationConfig(Section):
    """How Prefect runs each stage task. Retries cover infrastructure failures only (a user error fails at once);
    a retried stage resumes from its last committed checkpoint."""

    retries: int = Field(1, ge=0)
    retry_delay_s: float = Field(10.0, ge=0.0)
    stage_timeout_s: float | None = Field(None, gt=0.0, description="per stage attempt; none by default")
    lock_timeout_s: float | None = Field(
        None, gt=0.0, description="wait at most this long for another run writing the same stage artifact"
    )


class OptimizerConfig(Section):
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0)


class MegatronConfig(Section):
    """Model parallelism of the Megatron-core backend; data parallel = world_size / (tensor x pipeline)."""

    tensor_parallel: int = Field(1, gt=0, description="ranks that split each layer's matrices")
    pipeline_parallel: int = Field(1, gt=0, description="stages that split the layers (in order)")
    distributed_optimizer: bool = Field(True, description="shard optimizer state over data-parallel ranks")


class PolicyConfig(Section):
    backend: Literal["fsdp2", "megatron"] = "fsdp2"
    world_size: int = Field(2, gt=0, description="trainer ranks: FSDP2 data-parallel ranks, or Megatron TP x PP x DP")
    micro_batch_tokens: int = Field(2048, gt=0, description="padded-token budget of one micro-batch")
    sequence_packing: bool = Field(
        False,
        description="fsdp2: several sequences per row (position ids restart, attention within each) instead of "
        "one padded row each; causal-LM roles only (a reward model's rows stay padded)",
    )
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    threads_per_worker: int = Field(1, gt=0)
    gpus_per_worker: float = Field(
        0.0, ge=0.0, description="GPUs each trainer rank reserves in its Ray bundle; 0 trains on CPU (GPUs hidden)"
    )
    megatron: MegatronConfig = MegatronConfig()

    @model_validator(mode="after")
    def _megatron_fits(self) -> "PolicyConfig":
        model_parallel = self.megatron.tensor_parallel * self.megatron.pipeline_parallel
        if self.backend == "megatron" and self.world_size % model_parallel:
            raise ValueError(
                f"policy.world_size={self.world_size} is not a multiple of policy.megatron.tensor_parallel x "
                f"pipeline_parallel = {model_parallel}"
            )
        if self.backend == "megatron" and self.sequence_packing:
            raise ValueError("policy.sequence_packing needs policy.backend=fsdp2 (the megatron backend pads every row)")
        return self


class GenerationConfig(Section):
    backend: Literal["vllm", "hf"] = Field("vllm", description="vllm runs in its own venv (posttrain env build vllm)")
    worker_env: Literal["vllm", "vllm-cuda"] = Field(
        "vllm", description="the vllm backend's worker environment: vllm (CPU build) or vllm-cuda"
    )
    num_workers: int = Field(1, gt=0, description="data-parallel generation workers")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="fp32 where logprobs feed a loss")
    max_model_len: int = Field(512, gt=0)
    kv_cache_bytes: int = Field(1 << 30, gt=0)
    threads_per_worker: int = Field(1, gt=0)
    request_timeout_s: float | None = Field(
        None,
        gt=0.0,
        description="a generation call taking longer counts as a lost worker: the workers are restarted and the "
        "call redone once",
    )
    gpus_per_worker: float = Field(
        0.0, ge=0.0, description="GPUs each generation worker reserves in its Ray bundle; 0 generates on CPU"
    )
    tensor_parallel_size: int = Field(
        1, gt=0, description="vllm backend: GPUs each engine splits the model over (all in its worker's bundle)"
    )
    refit_bucket_bytes: int = Field(64 << 20, gt=0, description="size of the weight buckets streamed on refit")
    refit: Literal["collective", "object_store"] = Field(
        "collective",
        description="how full weights reach the generators: a gloo broadcast from the trainer's rank 0, or Ray's "
        "object store (LoRA adapter refits always take the object store)",
    )
    lora_refit: Literal["merged", "adapter"] = Field(
        "merged",
        description="with grpo.lora: merged pushes base + adapters as full weights; adapter pushes the adapters "
        "alone, which vLLM applies to the base it loaded (vllm backend)",
    )

    @model_validator(mode="after")
    def _tensor_parallel_has_its_gpus(self) -> "GenerationConfig":
        if self.tensor_parallel_size > 1 and self.gpus_per_worker != self.tensor_parallel_size:
            raise ValueError(
                f"generation.tensor_parallel_size={self.tensor_parallel_size} splits each engine over that many GPUs: "
                f"set generation.gpus_per_worker to {self.tensor_parallel_size}"
            )
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError("generation.tensor_parallel_size > 1 needs generation.backend: vllm")
        return self


class LoraConfig(Section):
    """Low-rank adapters (peft) on a stage's model: only the adapters train; rank 0 is full fine-tuning."""

    rank: int = Field(0, ge=0, description="adapter rank r; 0: full fine-tuning")
    alpha: float = Field(32.0, gt=0.0, description="the adapters' output is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]); all-linear: every linear layer"
    )
    export_adapter: bool = Field(
        False,
        description="also commit the adapter alone (model/adapter/, for peft's PeftModel.from_pretrained on the base "
        "model); the merged model is always committed: later stages and vLLM load it",
    )

    @model_validator(mode="after")
    def _adapter_to_export(self) -> "LoraConfig":
        if self.export_adapter and not self.enabled:
            raise ValueError("lora.export_adapter needs adapters: set lora.rank > 0")
        return self

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class SFTConfig(Section):
    max_steps: int = Field(120, gt=0)
    batch_size: int = Field(64, gt=0, description="sequences per optimizer step, over all ranks")
    max_seq_len: int = Field(256, gt=0)
    val_every: int = Field(20, gt=0)
    val_size: int = Field(256, gt=0, description="validation sequences used per evaluation")
    checkpoint_every: int = Field(40, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    lora: LoraConfig = LoraConfig()


class RewardModelConfig(Section):
    """A reward model initialised from the SFT model, trained with the Bradley-Terry loss on preference pairs."""

    head: Literal["scalar", "likelihood"] = Field(
        "scalar",
        description="scalar: a sequence-classification head reads the last token; likelihood: the score is the "
        "response's summed token log-likelihood under the model (a generative reward model)",
    )
    max_steps: int = Field(60, gt=0)
    batch_size: int = Field(32, gt=0, description="preference pairs per step")
    max_seq_len: int = Field(256, gt=0)
    val_every: int = Field(20, gt=0)
    val_size: int = Field(128, gt=0, description="validation pairs")
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3, warmup_steps=5)
    lora: LoraConfig = LoraConfig()


class PolicyLossConfig(Section):
    """Settings of the clipped policy-gradient loss (PPO/GRPO family)."""

    ratio_clip_min: float = Field(0.2, ge=0.0)
    ratio_clip_max: float = Field(0.2, ge=0.0)
    ratio_clip_c: float | None = Field(None, gt=1.0, description="dual-clip bound for negative advantages")
    kl_beta: float = Field(0.0, ge=0.0)
    kl_type: Literal["k1", "k2", "k3"] = "k3"
    kl_input_clamp: float | None = 20.0
    kl_output_clamp: float | None = 10.0
    token_level_loss: bool = True
    disable_ppo_ratio: bool = Field(False, description="plain REINFORCE: -A * logprob")
    force_on_policy_ratio: bool = False
    sequence_level_ratio: bool = Field(False, description="GSPO: one ratio per sequence")
    importance_sampling: Literal["tis", "icepop"] | None = None
    is_max: float | None = None
    is_min: float | None = None

    @model_validator(mode="after")
    def _check_is_bounds(self) -> "PolicyLossConfig":
        if self.importance_sampling == "tis" and self.is_max is None:
            raise ValueError("importance_sampling='tis' needs is_max")
        if self.is_min is not None and self.is_max is not None and self.is_min > self.is_max:
            raise ValueError("is_min must be <= is_max")
        return self


class RewardFunctionConfig(Section):
    """A user reward function with TRL's signature: ``fn(prompts, completions, **columns) -> list[float | None]``."""

    function: str = Field(description="'package.module:name' or 'path/to/file.py:name'")
    weight: float = 1.0
    name: str | None = Field(None, description="logged as reward/<name>; default: the function's own name")


BUILTIN_ENVIRONMENTS = {
    "math": "engine.environments.math_verifier:MathVerifierEnv",
    "calculator": "engine.environments.calculator:CalculatorToolEnv",
}


class OverlongPenaltyConfig(Section):
    buffer: int = Field(gt=0, description="tokens before the limit where the penalty starts")
    penalty: float = Field(1.0, gt=0.0, description="the penalty at the limit, reached linearly")


class AsyncGRPOConfig(Section):
    """Generation overlapped with training on a fixed schedule: while step s trains, the generator samples step
    s + queue_size with the weights of step s, so every episode is exactly ``queue_size`` weight versions old and a
    run is as reproducible (and resumable) as a synchronous one."""

    enabled: bool = False
    queue_size: int = Field(1, ge=0, description="steps the generator runs ahead of the trainer (0: synchronous)")
    max_staleness: int = Field(
        1,
        ge=0,
        description="episodes sampled by weights more than this many steps older than the step that trains them are "
        "dropped (async/dropped) and the step's generation redone with the current weights",
    )


class CriticConfig(Section):
    """PPO's learned value model (``grpo.advantage_estimator: gae``): a decoder with a per-token value head, trained
    alongside the policy on the returns of generalized advantage estimation."""

    model: str | None = Field(
        None,
        description="the critic's starting model: a hub id, a folder or a store URI sharing the policy's tokenizer "
        "(a reward model's head becomes the value head); default the policy's starting model under a new head",
    )
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="discount per response token")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE's lambda: 0 is one-step TD, 1 is Monte Carlo")
    value_clip: float | None = Field(0.2, gt=0.0, description="PPO's clip of a value's move from its old value")
    warmup_steps: int = Field(0, ge=0, description="first steps that train the critic alone (the policy waits)")
    # 10x GRPO's policy rate: the value head starts from nothing (on the tiny task 1e-4 left the explained variance
    # at -0.15 after 50 steps, 1e-3 brings it to about 0 by step 9; the policy's accuracy is the same)
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3, warmup_steps=0, schedule="constant", grad_clip=1.0)


class GRPOConfig(Section):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    max_steps: int = Field(100, gt=0)
    prompts_per_step: int = Field(32, gt=0)
    generations_per_prompt: int = Field(8, gt=1)
    max_new_tokens: int = Field(8, gt=0, description="per assistant turn")
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    environment: str = Field("math", description="the environment of rows without a task column")
    environments: dict[str, str] = Field(
        default_factory=dict,
        description="task -> 'module:Class' or 'file.py:Class' (the environment protocol; built in: "
        + ", ".join(BUILTIN_ENVIRONMENTS)
        + ")",
    )
    reward_functions: list[RewardFunctionConfig] = Field(default_factory=list)
    reward_timeout_s: float | None = Field(
        None, gt=0.0, description="a reward-function call taking longer fails the completions it was given"
    )
    environment_timeout_s: float | None = Field(
        None, gt=0.0, description="an environment step taking longer fails the episodes it was given"
    )
    max_failed_groups: int = Field(
        0,
        ge=0,
        description="prompt groups a reward function or environment may fail on (never trained on) before the run "
        "stops",
    )
    max_rollout_turns: int = Field(1, gt=0)
    verifier_weight: float = Field(1.0, ge=0.0, description="weight of the environment's reward")
    reward_model_weight: float = Field(0.0, ge=0.0, description="weight of sigmoid(reward model score)")
    advantage_estimator: Literal["rloo", "grpo", "reinforce_pp", "gae"] = Field(
        "rloo",
        description="rloo: a sample's baseline is the mean reward of the other samples of its prompt; grpo: the "
        "mean of the whole group; reinforce_pp: rewards whitened over the whole batch; gae: PPO, per-token "
        "advantages from a learned critic (grpo.critic)",
    )
    normalize_advantages: bool = Field(
        False,
        description="rloo/grpo: divide by the baseline's std (unnormalized rloo advantages sum to 0 per group); "
        "gae: whiten the step's token advantages",
    )
    critic: CriticConfig = CriticConfig()
    ppo_epochs: int = Field(1, gt=0, description="passes over each step's episodes (the critic's too)")
    minibatches: int = Field(
        1,
        gt=0,
        description="optimizer updates per pass, each on a slice of whole prompt groups; with more than one update a "
        "step, the old policy's logprobs come from a forward pass before the first",
    )
    overlong_penalty: OverlongPenaltyConfig | None = Field(
        None, description="DAPO's soft penalty on responses near the length limit (max_new_tokens x turns)"
    )
    dynamic_sampling: bool = Field(False, description="drop prompt groups whose rewards are all equal")
    val_every: int = Field(20, gt=0)
    val_size: int = Field(128, gt=0, description="held-out prompts for greedy pass@1")
    checkpoint_every: int = Field(50, gt=0)
    loss: PolicyLossConfig = PolicyLossConfig()
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=0, schedule="constant", grad_clip=1.0)
    lora: LoraConfig = LoraConfig()
    async_: AsyncGRPOConfig = Field(
        AsyncGRPOConfig(),
        alias="async",
        description="off-policy data: the loss corrects against the generator's logprobs (loss.importance_sampling "
        "tis, is_max 2) unless the loss section says otherwise",
    )

    @model_validator(mode="after")
    def _off_policy_data_is_corrected(self) -> "GRPOConfig":
        """Episodes sampled by older weights need the importance-sampling correction to converge; it is on unless
        the user chose the loss's correction themselves."""
        if self.lags and self.async_.max_staleness > 0 and "importance_sampling" not in self.loss.model_fields_set:
            self.loss = self.loss.model_copy(update={"importance_sampling": "tis", "is_max": 2.0})
        return self

    @property
    def lags(self) -> bool:
        """Whether the generator runs ahead of the trainer (asynchronous GRPO with a queue)."""
        return self.async_.enabled and self.async_.queue_size > 0

    @model_validator(mode="after")
    def _environment_known(self) -> "GRPOConfig":
        known = {**BUILTIN_ENVIRONMENTS, **self.environments}
        if self.environment not in known:
            raise ValueError(f"grpo.environment {self.environment!r} is not one of {', '.join(sorted(known))}")
        return self

    def environment_classes(self) -> dict[str, str]:
        """Every environment a run may route to, by task: the built-ins and the user's own."""
        return {**BUILTIN_ENVIRONMENTS, **self.environments}


class DPOConfig(Section):
    max_steps: int = Field(60, gt=0)
    batch_size: int = Field(32, gt=0, description="preference pairs per step")
    max_seq_len: int = Field(256, gt=0)
    beta: float = Field(0.1, gt=0.0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    sft_weight: float = Field(0.0, ge=0.0, description="weight of an NLL term on the chosen responses")
    val_every: int = Field(20, gt=0)
    val_size: int = Field(128, gt=0, description="validation pairs")
    checkpoint_every: int = Field(50, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=5)
    lora: LoraConfig = LoraConfig()


class DistillConfig(Section):
    """On-policy distillation: the student samples, a frozen teacher scores each sampled token, and the student is
    trained toward the teacher with GRPO's clipped policy loss on a per-token advantage of teacher logprob - student
    logprob (a reverse KL). Prompts, environments and rewards (logged, not trained on) are GRPO's."""

    teacher: str | None = Field(
        None,
        description="the teacher: a hub id, a folder, or a store/fsspec URI such as a GRPO stage's model; "
        "it must share the student's tokenizer",
    )
    max_steps: int = Field(50, gt=0)
    prompts_per_step: int = Field(32, gt=0)
    generations_per_prompt: int = Field(4, gt=0)
    max_new_tokens: int = Field(8, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    val_every: int = Field(25, gt=0)
    val_size: int = Field(128, gt=0, description="held-out prompts for greedy pass@1")
    checkpoint_every: int = Field(50, gt=0)
    loss: PolicyLossConfig = PolicyLossConfig()
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=0, schedule="constant", grad_clip=1.0)
    lora: LoraConfig = LoraConfig()


class EvaluateConfig(Section):
    size: int = Field(256, gt=0, description="held-out rows")
    max_new_tokens: int = Field(8, gt=0)
    samples: int = Field(1, gt=0, description="k of pass@k, sampled at `temperature` (1: greedy pass@1 only)")
    temperature: float = Field(1.0, gt=0.0)


class StagesConfig(Section):
    """Which optional stages a pipeline runs."""

    sft: bool = Field(True, description="false: RL or DPO start from model.name itself (an instruct model)")
    reward_model: bool | Literal["auto"] = Field(
        "auto", description="auto: only where GRPO uses it (grpo.reward_model_weight > 0)"
    )


class ExportConfig(Section):
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="dtype of committed model weights; auto: bf16 for bf16 training, else fp32"
    )


class ProfileConfig(Section):
    """torch profiler traces of chosen training steps, from the trainer ranks and the generation workers."""

    steps: list[int] | None = Field(
        None, description="[first, last] optimizer steps (1-based, inclusive) of every training stage to trace"
    )
    ranks: list[int] = Field([0], description="the trainer ranks that trace (generation workers all do)")

    @field_validator("steps")
    @classmethod
    def _a_range(cls, steps: list[int] | None) -> list[int] | None:
        if steps is not None and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            raise ValueError("must be [first, last] with 1 <= first <= last")
        return steps


class PipelineConfig(Section):
    """Everything one pipeline run needs. The Prefect UI renders it as a form."""

    name: str = Field("sft", description="pipeline name, shown in MLflow and Prefect")
    seed: int = 0
    workdir: str = Field(".posttrain", description="local state: default store, MLflow db, caches")
    resume: str = Field("auto", description="auto | never | <checkpoint URI>")
    cache: bool = Field(True, description="skip a stage whose committed artifact already exists")
    stages: StagesConfig = StagesConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    policy: PolicyConfig = PolicyConfig()
    generation: GenerationConfig = GenerationConfig()
    sft: SFTConfig = SFTConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    grpo: GRPOConfig = GRPOConfig()
    dpo: DPOConfig = DPOConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    profile: ProfileConfig = ProfileConfig()

    @field_validator("resume")
    @classmethod
    def _resume_form(cls, value: str) -> str:
        if value in ("auto", "never") or "://" in value or value.startswith("/"):
            return value
        raise ValueError("must be 'auto', 'never' or a checkpoint URI")

    @model_validator(mode="after")
    def _lora_on_fsdp2(self) -> "PipelineConfig":
        if self.policy.backend != "fsdp2":
            for stage in ("sft", "reward_model", "grpo", "dpo", "distill"):
                if getattr(self, stage).lora.enabled:
                    raise ValueError(
                        f"{stage}.lora.rank={getattr(self, stage).lora.rank}: LoRA runs on the fsdp2 trainer only "
                        f"(policy.backend={self.policy.backend}); set {stage}.lora.rank=0 or policy.backend=fsdp2"
                    )
        return self

    @model_validator(mode="after")
    def _critic_on_fsdp2(self) -> "PipelineConfig":
        if self.grpo.advantage_estimator == "gae" and self.policy.backend != "fsdp2":
            raise ValueError(
                f"grpo.advantage_estimator=gae: the critic's value head runs on the fsdp2 trainer only "
                f"(policy.backend={self.policy.backend})"
            )
        return self

    @model_validator(mode="after")
    def _adapter_refit_has_adapters(self) -> "PipelineConfig":
        if self.generation.lora_refit == "adapter":
            if not (self.grpo.lora.enabled or self.distill.lora.enabled):
                raise ValueError("generation.lora_refit=adapter needs adapters to push: set grpo.lora.rank > 0")
            if self.generation.backend != "vllm":
                raise ValueError("generation.lora_refit=adapter needs generation.backend=vllm")
        return self

    @model_validator(mode="after")
    def _fill_local_defaults(self) -> "PipelineConfig":
        workdir = Path(self.workdir).expanduser().resolve()
        if self.workdir != str(workdir):
            self.workdir = str(workdir)
        if self.storage.root is None:
            self.storage.root = f"file://{workdir / 'store'}"
        if self.tracking.uri is None:
            self.tracking.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"
        if self.tracking.dir is None:
            self.tracking.dir = str(workdir / "tracking")
        return self

    def trains_reward_model(self) -> bool:
        """Whether the GRPO pipeline trains a reward model (``stages.reward_model``)."""
        if self.stages.reward_model == "auto":
            return self.grpo.reward_model_weight > 0
        return bool(self.stages.reward_model)

    def export_dtype(self) -> str:
        """The torch dtype name committed models are written in (``export.dtype``)."""
        named = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
        if self.export.dtype == "auto":
            return "bfloat16" if self.policy.precision == "bf16" else "float32"
        return named[self.export.dtype]

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with secrets masked (``engine.secrets``): what every surface a run writes gets."""
        from engine.secrets import redact

        return redact(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        """The config as YAML, secrets masked."""
        return yaml.safe_dump(self.redacted(), sort_keys=False)

    def section(self, *names: str) -> dict[str, Any]:
        """The named sections as plain data: what a stage's cache key is computed from."""
        return {name: getattr(self, name).model_dump(mode="json") for name in names}


# ------------------------------------------------------------------------------------------ loading


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def resolve_config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """A path as given, relative to the including file, or a bare name from configs/."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    stem = Path(name).name
    candidates += [CONFIG_DIR / stem, CONFIG_DIR / f"{stem}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config file not found: {name}")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _code_paths_from(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """A YAML file names the user's code files (``grpo.reward_functions``, ``grpo.environments``) relative to itself,
    as it names its ``defaults:``; made absolute here, so the run finds them from any working directory."""
    grpo = data.get("grpo")
    if not isinstance(grpo, dict):
        return data

    def absolute(spec: Any) -> Any:
        if not isinstance(spec, str) or ":" not in spec:
            return spec
        target, _, name = spec.rpartition(":")
        if target.endswith(".py") and not Path(target).is_absolute() and (base / target).is_file():
            return f"{(base / target).resolve()}:{name}"
        return spec

    for entry in grpo.get("reward_functions") or []:
        if isinstance(entry, dict):
            entry["function"] = absolute(entry.get("function"))
    if isinstance(grpo.get("environments"), dict):
        grpo["environments"] = {task: absolute(spec) for task, spec in grpo["environments"].items()}
    return data


def load_yaml_with_defaults(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in _seen:
        raise ConfigError(f"config file {path} includes itself through `defaults:`")
    data = _code_paths_from(_read_yaml(path), path.parent)
    parents = data.pop("defaults", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        parent_path = resolve_config_path(parent, relative_to=path.parent)
        merged = deep_merge(merged, load_yaml_with_defaults(parent_path, _seen + (path,)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like a.b.c=value")
    dotted, raw = text.split("=", 1)
    keys = [k for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation (plain or Optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def check_known_keys(data: dict[str, Any], model: type[BaseModel], prefix: str = "") -> None:
    """Reject unknown keys with the full dotted path and the closest known name (a field's alias is its name in a
    config: ``grpo.async``)."""
    fields = {field.alias or name: field for name, field in model.model_fields.items()}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            shown = path.encode("unicode_escape").decode()  # a key the user typed may hold a line break
            raise ConfigError(f"unknown config key '{shown}'{hint}")
        sub = _section_type(fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            check_known_keys(value, sub, prefix=f"{path}.")


def first_error_line(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"invalid config value for '{field}': {message}{shown}" if field else f"invalid config: {message}"


def validate_config(data: dict[str, Any]) -> PipelineConfig:
    check_known_keys(data, PipelineConfig)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(first_error_line(exc)) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] | dict[str, Any] = ()) -> PipelineConfig:
    """Load a YAML file (with its `defaults:`), apply dotted overrides, and validate against the schema."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml_with_defaults(resolve_config_path(path))
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for keys, value in items:
        if isinstance(keys, str):
            keys = keys.split(".")
        set_dotted(data, list(keys), value)
    return validate_config(data)


class RunParameters(BaseModel):
    """The form a pipeline run takes (the Prefect UI renders it): a config and overrides on top."""

    config: str = Field("sft_tiny", description="a config file path, or the name of one in configs/")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys, e.g. {'sft.max_steps': 20}")
    resume: str | None = Field(None, description="auto | never | <checkpoint URI>; default: the config's")

    def resolve(self) -> PipelineConfig:
        """The config, with the overrides, the resume setting, and the secret overrides this process was handed
        through its environment (``engine.secrets``: they never travel as parameters)."""
        from engine.secrets import OVERRIDES_ENV

        overrides = dict(self.overrides)
        if self.resume is not None:
            overrides["resume"] = self.resume
        overrides.update(json.loads(os.environ.get(OVERRIDES_ENV) or "{}"))
        return load_config(self.config, overrides)
