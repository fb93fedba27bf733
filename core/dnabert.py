"""DNABERT-S nucleotide encoder (SPEC section 3): 768 values per frame, no remote code.

The published VirNucPro loads `zhihan1996/DNABERT-S` with `trust_remote_code`, which runs the
model repository's `bert_layers.py` (MosaicBERT as adapted by DNABERT-2). We re-implement that
architecture here so the checkpoint loads as published, without executing downloaded code and
without Triton:

- embeddings: word + token type (always type 0), LayerNorm; no position embeddings;
- each layer: fused `Wqkv` self-attention with the symmetric ALiBi bias -slope_h * |i - j|,
  output dense + post-LayerNorm on the residual, then a gated-linear-unit MLP
  (`gated_layers` without bias; exact GELU on the first half times the second half; `wo`;
  post-LayerNorm on the residual);
- the embedding of a sequence is the mean of the last hidden layer over all its tokens,
  [CLS] and [SEP] included.

Dropout is omitted: it is the identity at inference. Module attribute names mirror the
published state dict (`embeddings.*`, `encoder.layer.N.*`), so it loads with strict checking.
The model's one forward runs on packed batches everywhere: float32 on the CPU, float16 and
compiled on a GPU, with the ALiBi attention backend `DNABERTEncoder` chose once for the device.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from torch import Tensor, nn

from core import attention as attention_module
from core.attention import Attention as AttentionBackend
from core.attention import Segments
from core.engine import Compiled, ConvertedWeights, compile_state, compiles, describe, finished, run_batches
from core.errors import ModelLoadError
from core.packing import PackedBatch, PreparedBatches, auto_batch_tokens, prepare_batches, segment_mean

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
PYTORCH_FILE = "pytorch_model.bin"
TOKENIZER_FILE = "tokenizer.json"

CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
# Order and ids of DNABERT-2's special tokens ([UNK]=0, [CLS]=1, [SEP]=2, [PAD]=3, [MASK]=4).
SPECIAL_TOKENS = ("[UNK]", CLS_TOKEN, SEP_TOKEN, "[PAD]", "[MASK]")

# Checkpoint entries that play no part in the embedding: the BertModel pooler (in the
# DNABERT-S file), the masked-LM head (DNABERT-2 BertForMaskedLM files), and the embeddings'
# all-zero token_type_ids buffer (non-persistent in the published code; accepted should a
# re-saved file carry it).
UNUSED_KEY_PREFIXES = ("pooler.", "cls.")
UNUSED_BUFFER_KEYS = frozenset({"embeddings.token_type_ids"})
# Prefix of the encoder's keys when the checkpoint was saved from a wrapper model
# (e.g. DNABERT-2's BertForMaskedLM); DNABERT-S is saved from BertModel and has none.
WRAPPER_PREFIX = "bert."

CPU_BATCH_TOKENS = 2048  # on the GPU the budget comes from free memory (DNABERTEncoder)
REFERENCE_ATTENTION = attention_module.make("per_sequence", alibi=True, device=torch.device("cpu"))
CACHE_NAME = "dnabert"  # converted weights' file names begin with it (job.model_cache)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DNABERTConfig:
    """The `config.json` fields that shape the encoder.

    Other fields are ignored because they do not change its output: `hidden_act` (the
    published GLU always uses exact GELU; the field only drives the masked-LM head),
    `alibi_starting_size` (the size of a pre-allocated bias table), `position_embedding_type`
    (reads "absolute", yet the published code has no position embeddings), dropout
    probabilities and `pad_token_id` (training only).
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, fields: Mapping[str, object]) -> DNABERTConfig:
        """Build from a parsed `config.json`; raise ModelLoadError on missing or bad fields."""
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size")
        missing = [name for name in required if name not in fields]
        if missing:
            raise ModelLoadError(f"{CONFIG_FILE} lacks {', '.join(missing)}")
        try:
            config = cls(
                **{name: int(fields[name]) for name in required},
                type_vocab_size=int(fields.get("type_vocab_size", 2)),
                layer_norm_eps=float(fields.get("layer_norm_eps", 1e-12)),
            )
        except (TypeError, ValueError) as error:
            raise ModelLoadError(f"{CONFIG_FILE} has a field of the wrong type: {error}") from None
        if config.hidden_size % config.num_attention_heads:
            raise ModelLoadError(
                f"{CONFIG_FILE}: hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_attention_heads}"
            )
        return config


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slope per head, as DNABERT-2 computes them.

    For a power of two n the slopes are r, r^2, ..., r^n with r = 2^(-8/n). Otherwise (12 heads
    in DNABERT-S) the slopes of the nearest lower power of two are followed by every other
    slope of the next higher one, until there are n.
    """
    if math.log2(num_heads).is_integer():
        ratio = 2.0 ** (-(2.0 ** -(math.log2(num_heads) - 3)))
        return [ratio * ratio**i for i in range(num_heads)]
    lower = 2 ** math.floor(math.log2(num_heads))
    return alibi_slopes(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def _project(x: Tensor, w_qkv: Tensor, b_qkv: Tensor, heads: int, heads_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The fused Wqkv projection, split into q, k, v in the attention backend's layout.

    `Wqkv` output columns are [q | k | v], each split into heads of consecutive columns.
    q, k and v are strided views of the GEMM's output, not copies: every backend takes any
    row and head stride (each head's values stay contiguous)."""
    total, width = x.shape
    qkv = F.linear(x, w_qkv, b_qkv).view(total, 3, heads, width // heads)
    if heads_first:
        return tuple(qkv[:, i].transpose(0, 1) for i in range(3))
    return tuple(qkv[:, i] for i in range(3))


def _after_attention(x: Tensor, attended: Tensor, heads_first: bool, w_d: Tensor, b_d: Tensor,
                     ln1_w: Tensor, ln1_b: Tensor, w_g: Tensor, w_o: Tensor, b_o: Tensor,
                     ln2_w: Tensor, ln2_b: Tensor, eps: float, intermediate: int) -> Tensor:
    """Attention output dense + residual + post-LayerNorm, then the gated-linear-unit MLP
    (exact GELU of the first half times the second half, `wo`) + residual + post-LayerNorm."""
    total, width = x.shape
    if heads_first:
        attended = attended.transpose(0, 1)
    x = F.layer_norm(F.linear(attended.reshape(total, width), w_d, b_d) + x, (width,), ln1_w, ln1_b, eps)
    gated, linear = F.linear(x, w_g).split(intermediate, dim=-1)
    return F.layer_norm(F.linear(F.gelu(gated) * linear, w_o, b_o) + x, (width,), ln2_w, ln2_b, eps)


PROJECT = Compiled(_project, dynamic_args=(0,))
AFTER_ATTENTION = {  # by attention layout: the token dimension of `attended` is 1 when heads come first
    False: Compiled(_after_attention, dynamic_args=(0, 1)),
    True: Compiled(_after_attention, dynamic_args=(0, (1, 1))),
}
COMPILED_PARTS = (PROJECT, *AFTER_ATTENTION.values())


class Embeddings(nn.Module):
    """Word plus token-type embedding (type 0 for every token), then LayerNorm."""

    def __init__(self, config: DNABERTConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.LayerNorm(self.word_embeddings(tokens) + self.token_type_embeddings.weight[0])


class SelfAttention(nn.Module):
    """The fused query/key/value projection."""

    def __init__(self, config: DNABERTConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, dtype=dtype)


class AttentionOutput(nn.Module):
    """Output projection, residual add, post-LayerNorm."""

    def __init__(self, config: DNABERTConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)


class Attention(nn.Module):
    """Self-attention block; the attribute `self` is the checkpoint's name for it."""

    def __init__(self, config: DNABERTConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.self = SelfAttention(config, dtype)
        self.output = AttentionOutput(config, dtype)


class GatedMLP(nn.Module):
    """Gated-linear-unit feed-forward: `gated_layers` (no bias), `wo`, post-LayerNorm."""

    def __init__(self, config: DNABERTConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False, dtype=dtype)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size, dtype=dtype)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)


class Layer(nn.Module):
    """One transformer layer: ALiBi self-attention block, then the gated MLP."""

    def __init__(self, config: DNABERTConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.attention = Attention(config, dtype)
        self.mlp = GatedMLP(config, dtype)

    def forward(self, x: Tensor, segments: Segments, attention: AttentionBackend, slopes: Tensor,
                compile: bool) -> Tensor:
        first = attention.heads_first
        wqkv, out, mlp = self.attention.self.Wqkv, self.attention.output, self.mlp
        q, k, v = PROJECT(x, wqkv.weight, wqkv.bias, self.config.num_attention_heads, first, compile=compile)
        attended = attention(q, k, v, segments, None, slopes)
        return AFTER_ATTENTION[first](
            x, attended, first, out.dense.weight, out.dense.bias, out.LayerNorm.weight, out.LayerNorm.bias,
            mlp.gated_layers.weight, mlp.wo.weight, mlp.wo.bias, mlp.layernorm.weight, mlp.layernorm.bias,
            self.config.layer_norm_eps, self.config.intermediate_size, compile=compile)


class LayerStack(nn.Module):
    """The checkpoint's `encoder`: the list of layers."""

    def __init__(self, config: DNABERTConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config, dtype) for _ in range(config.num_hidden_layers))


class DNABERTModel(nn.Module):
    """DNABERT-2 / DNABERT-S encoder over packed sequences; returns the last hidden layer.

    Parameters are created in `dtype` (float16 for the GPU); the ALiBi slopes stay float32.
    """

    def __init__(self, config: DNABERTConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config, dtype)
        self.encoder = LayerStack(config, dtype)
        slopes = torch.tensor(alibi_slopes(config.num_attention_heads), dtype=torch.float32)
        self.register_buffer("alibi_slopes", slopes, persistent=False)

    def forward(self, tokens: Tensor, segments: Segments, attention: AttentionBackend = REFERENCE_ATTENTION,
                compile: bool = False) -> Tensor:
        """tokens: [total] int64, sequences end to end as `segments` places them (rows past
        segments.real are padding); returns [total, hidden_size] in the model's dtype.
        No host-device synchronisation."""
        x = self.embeddings(tokens)
        for layer in self.encoder.layer:
            x = layer(x, segments, attention, self.alibi_slopes, compile)
        return x


def load_published_state_dict(model: DNABERTModel, state_dict: Mapping[str, Tensor]) -> None:
    """Load a checkpoint with the published parameter names, strictly.

    Accepts the DNABERT-S layout (BertModel keys: `embeddings.*`, `encoder.*`, `pooler.*`)
    and a `bert.`-prefixed one; unused entries (pooler, MLM head, serialised buffers) are
    dropped. Any other missing, unexpected or misshapen entry raises ModelLoadError.
    """
    wrapped = any(key.startswith(WRAPPER_PREFIX) for key in state_dict)
    used: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if wrapped and key.startswith(WRAPPER_PREFIX):
            key = key[len(WRAPPER_PREFIX):]
        if key.startswith(UNUSED_KEY_PREFIXES) or key in UNUSED_BUFFER_KEYS:
            continue
        used[key] = value
    expected = model.state_dict()
    missing = sorted(expected.keys() - used.keys())
    unexpected = sorted(used.keys() - expected.keys())
    if missing or unexpected:
        raise ModelLoadError(
            "DNABERT checkpoint does not match the DNABERT-2/DNABERT-S layout: "
            f"missing {_listing(missing)}; unexpected {_listing(unexpected)}"
        )
    misshapen = [
        f"{key} {tuple(used[key].shape)} (config implies {tuple(expected[key].shape)})"
        for key in sorted(expected)
        if used[key].shape != expected[key].shape
    ]
    if misshapen:
        raise ModelLoadError(f"DNABERT checkpoint shapes do not match {CONFIG_FILE}: "
                             f"{_listing(misshapen)}")
    model.load_state_dict(used, strict=True)


def _listing(items: Sequence[str], limit: int = 8) -> str:
    """Up to `limit` items for an error message, with a count of the rest."""
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


class DNATokenizer:
    """The model's own `tokenizer.json`, special tokens [CLS] ... [SEP] added, no truncation.

    The published tokenizer adds them through its TemplateProcessing post-processor, as the
    Hugging Face tokenizer does; a tokenizer.json without a post-processor gets them by id.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        cls_id = tokenizer.token_to_id(CLS_TOKEN)
        sep_id = tokenizer.token_to_id(SEP_TOKEN)
        if cls_id is None or sep_id is None:
            raise ModelLoadError(f"{TOKENIZER_FILE} has no {CLS_TOKEN} or {SEP_TOKEN} token")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.cls_id = cls_id
        self.sep_id = sep_id
        self._adds_specials = tokenizer.post_processor is not None
        probe = self.encode("ACGT")
        if probe[0] != cls_id or probe[-1] != sep_id:
            raise ModelLoadError(
                f"{TOKENIZER_FILE}: its post-processor does not add {CLS_TOKEN} ... {SEP_TOKEN}"
            )

    @classmethod
    def from_file(cls, path: Path) -> DNATokenizer:
        """Read a `tokenizer.json`; raise ModelLoadError when it cannot be parsed."""
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises plain Exception
            raise ModelLoadError(f"cannot read {path}: {error}") from None
        return cls(tokenizer)

    def ids(self) -> list[int]:
        """Every id the tokenizer can produce (its vocabulary and added tokens)."""
        return list(self._tokenizer.get_vocab(with_added_tokens=True).values())

    def encode(self, sequence: str) -> list[int]:
        """Token ids of one sequence, [CLS] first and [SEP] last."""
        ids = self._tokenizer.encode(sequence).ids
        return ids if self._adds_specials else [self.cls_id, *ids, self.sep_id]

    def encode_many(self, sequences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of every sequence (as `encode` gives them) laid end to end, and the lengths.

        One `encode_batch` call: the tokenizers library runs it in parallel without the GIL.
        """
        if not sequences:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        encoded = [e.ids for e in self._tokenizer.encode_batch(list(sequences))]
        if not self._adds_specials:
            encoded = [[self.cls_id, *ids, self.sep_id] for ids in encoded]
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths


DNA_MAX_BATCH_TOKENS = 65536
DNA_BYTES_PER_TOKEN_PER_DIM = 64  # peak activation bytes per packed token, per unit of hidden size


class DNABERTEncoder:
    """Tokenizes, packs under a token budget, runs DNABERT, and mean-pools per sequence.

    The attention backend is chosen once here for the device (`self.attention.name`, for the
    log), and the model runs compiled on CUDA. `prepare` (host work, thread-safe) and `run`
    (device work, no sync) let a caller overlap the two.
    """

    loaded_from = "given"  # load_dnabert sets it: "cache", "source", "source (cached now)" or "source (caching)", for the log
    warm = False  # warm_up ran to the end: every batch shape is compiled

    def __init__(self, model: DNABERTModel, tokenizer: DNATokenizer, device: torch.device,
                 batch_tokens: int | None, *, attention: str | None = None,
                 compile: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = model.embeddings.word_embeddings.weight.dtype
        heads = model.config.num_attention_heads
        self.attention = attention_module.select(True, device, self.dtype, attention, heads,
                                                 model.config.hidden_size // heads)
        self.fallback = attention_module.make("sdpa_padded", alibi=True)
        self.compile = compiles(compile, device)
        self.packs = device.type == "cuda"  # one sequence per batch on the CPU: core.packing.prepare_batches
        if batch_tokens is None:
            batch_tokens = auto_batch_tokens(device, DNA_BYTES_PER_TOKEN_PER_DIM * model.config.hidden_size,
                                             DNA_MAX_BATCH_TOKENS, cpu_default=CPU_BATCH_TOKENS)
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        self.batch_tokens = batch_tokens

    @property
    def dim(self) -> int:
        """Embedding width: 768 for DNABERT-S."""
        return self.model.config.hidden_size

    @property
    def backend(self) -> str:
        """What runs, for the log: e.g. 'float16 flex compiled' or 'float32 per_sequence eager'."""
        return describe(self.dtype, self.attention.name, compile_state(self.compile, COMPILED_PARTS))

    def prepare(self, sequences: Sequence[str]) -> PreparedBatches:
        """Host work: tokenize and pack (pinned for the GPU). Safe to call from another thread."""
        flat, lengths = self.tokenizer.encode_many(sequences)
        return prepare_batches(flat, lengths, self.batch_tokens, packs=self.packs, pin=self.device.type == "cuda")

    def run(self, prepared: PreparedBatches) -> tuple[Tensor, Tensor]:
        """Device work: ([n, dim] float32 embeddings, [n] bool all-finite) on the device."""
        return run_batches(prepared, self.device, self.dim, self._pooled)

    def _pooled(self, batch: PackedBatch) -> Tensor:
        """The published pooling: the mean over every token, [CLS] and [SEP] included."""
        attention = self.attention
        total = attention.pads_to(batch.total)
        if total > max(batch.total, attention.pads_to(self.batch_tokens)):
            # a lone sequence over the budget would pad to a bucket no warm-up compiled
            attention, total = self.fallback, batch.total
        tokens = batch.tokens
        if total > batch.total:  # the backend's padding rows, a dummy sequence of [SEP]s
            tokens = F.pad(tokens, (0, total - batch.total), value=self.tokenizer.sep_id)
        bounds = batch.bounds if batch.bounds is not None else batch.cu_seqlens.tolist()
        segments = Segments(batch.cu_seqlens, bounds, batch.max_seqlen, total)
        hidden = self.model(tokens, segments, attention, self.compile)
        return segment_mean(hidden[: batch.total], batch.cu_seqlens, validate=False)

    def warm_up(self, stop: threading.Event | None = None) -> None:
        """Compile now for every padded size a batch can have (FlexAttention is compiled once
        per token bucket, the rest of the layer once for all sizes), so that no batch waits
        on the compiler in the middle of a run. Nothing to do when running eagerly or once
        done. Returns early, between sizes, once `stop` is set."""
        if not self.compile or self.warm:
            return
        limit, smallest = self.batch_tokens, self.attention.pads_to(1)
        if smallest == 1:  # no padding buckets: two sizes settle the one dynamic-shape graph
            totals = [max(1, limit // 2), limit]
        else:  # one batch per power-of-two bucket, up to the budget's
            totals = [smallest]
            while totals[-1] < self.attention.pads_to(limit):
                totals.append(totals[-1] * 2)
            totals = [min(total, limit) for total in totals]
        for total in totals:
            if stop is not None and stop.is_set():
                return
            lengths = np.full(max(1, total // 100), 100, dtype=np.int64)
            lengths[-1] += total - int(lengths.sum())
            flat = np.full(total, self.tokenizer.sep_id, dtype=np.int64)
            out, _ = self.run(prepare_batches(flat, lengths, self.batch_tokens, packs=self.packs, pin=self.device.type == "cuda"))
            out.cpu()
        self.warm = True

    def embed(self, sequences: Sequence[str]) -> Tensor:
        """[n, dim] float32 CPU embeddings in input order: mean over all tokens of each."""
        return finished("DNABERT-S", self.run(self.prepare(sequences)))


def load_dnabert(source: str, device: torch.device,
                 batch_tokens: int | None = None, *, attention: str | None = None,
                 compile: bool | None = None, cache: ConvertedWeights | None = None) -> DNABERTEncoder:
    """Load DNABERT-S from a local Hugging Face model directory or a cached hub id.

    The directory holds `config.json`, `model.safetensors` or `pytorch_model.bin` (read
    with weights_only) and `tokenizer.json`. Raises ModelLoadError with a plain message
    when any of it is missing or does not match. On CUDA the model runs in fp16, compiled;
    batch_tokens None derives the packed batch size from free GPU memory. With `cache` (keyed
    by the directory's sha256) the weights as run, the config and the tokenizer come from its
    file when it holds them, without reading the directory; otherwise they are loaded from
    the directory and written there. `encoder.loaded_from` says which.
    """
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cached = model_from_cache(cache, device, dtype) if cache is not None else None
    if cached is not None:
        model, tokenizer = cached
        loaded_from = "cache"
    else:
        directory = resolve_model_dir(source)
        config = DNABERTConfig.from_dict(_read_json(directory / CONFIG_FILE))
        model = _unfilled_model(config, dtype, device)
        load_published_state_dict(model, _read_weights(directory))  # strict: every parameter is filled
        tokenizer = DNATokenizer.from_file(_require_file(directory / TOKENIZER_FILE))
        check_vocabulary(tokenizer, config, directory)
        model = model.eval().requires_grad_(False)
        loaded_from = "source"
        if cache is not None and cache.write(CACHE_NAME, model.state_dict(), {
            "config": json.dumps(asdict(config)), "tokenizer": (directory / TOKENIZER_FILE).read_text()
        }):
            loaded_from = "source (caching)" if cache.in_background else "source (cached now)"
    encoder = DNABERTEncoder(model, tokenizer, device, batch_tokens, attention=attention, compile=compile)
    encoder.loaded_from = loaded_from
    return encoder


def _unfilled_model(config: DNABERTConfig, dtype: torch.dtype, device: torch.device) -> DNABERTModel:
    """The model on `device` with its parameters allocated but not initialised: they are
    about to be loaded (a random initialisation of DNABERT-S's 117M costs seconds)."""
    with torch.device("meta"):
        model = DNABERTModel(config, dtype)
    model.to_empty(device=device)
    _set_slopes(model, device)
    return model


def _set_slopes(model: DNABERTModel, device: torch.device) -> None:
    """The ALiBi slopes (a buffer outside the state dict) of a model built on the meta device."""
    model.alibi_slopes = torch.tensor(alibi_slopes(model.config.num_attention_heads), dtype=torch.float32,
                                      device=device)


def model_from_cache(cache: ConvertedWeights, device: torch.device,
                     dtype: torch.dtype) -> tuple[DNABERTModel, DNATokenizer] | None:
    """The model (straight onto `device`) and tokenizer from the converted weights in `cache`;
    None when the cache has no usable file for this dtype (the reason is logged)."""
    loaded = cache.read(CACHE_NAME, dtype, device)
    if loaded is None:
        return None
    state, metadata = loaded
    try:
        config = DNABERTConfig(**json.loads(metadata["config"]))
        with torch.device("meta"):
            model = DNABERTModel(config, dtype)
        model.load_state_dict(state, assign=True)  # the loaded tensors become the parameters
        _set_slopes(model, device)
        tokenizer = DNATokenizer(Tokenizer.from_str(metadata["tokenizer"]))
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises plain Exception
        log.warning("ignoring the converted weights of %s: they do not fit DNABERT-S (%s)", cache.source_sha256[:12], error)
        return None
    return model.eval().requires_grad_(False), tokenizer


def check_vocabulary(tokenizer: DNATokenizer, config: DNABERTConfig, directory: Path) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding table: every batch would
    fail (an index error on the CPU, a device assert on the GPU) instead of the load."""
    largest = max(tokenizer.ids())
    if largest >= config.vocab_size:
        raise ModelLoadError(
            f"{directory / TOKENIZER_FILE} has token ids up to {largest}, but the model's vocabulary "
            f"({CONFIG_FILE} vocab_size) has {config.vocab_size} entries: the tokenizer is not this "
            "model's; use the tokenizer.json saved with the weights"
        )


def resolve_model_dir(source: str) -> Path:
    """A local directory as is; a hub id (`owner/name`) from the local Hugging Face cache only."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(f"DNABERT model directory {source} does not exist")
    advice = (
        f"DNABERT model {source!r} is not a local directory and is not in the local Hugging "
        f"Face cache; download it (for example `huggingface-cli download {source} "
        f"--local-dir DIR`) and pass DIR instead"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(advice) from None
    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (OSError, ValueError):
        raise ModelLoadError(advice) from None


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: a DNABERT model directory needs {path.name}")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(_require_file(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON: {error}") from None


def _read_weights(directory: Path) -> dict[str, Tensor]:
    """Tensors from model.safetensors if present, else pytorch_model.bin without unpickling code."""
    safetensors_path = directory / SAFETENSORS_FILE
    pytorch_path = directory / PYTORCH_FILE
    try:
        if safetensors_path.is_file():
            return load_safetensors(str(safetensors_path))
        if pytorch_path.is_file():
            state_dict = torch.load(pytorch_path, map_location="cpu", weights_only=True)
            if not isinstance(state_dict, Mapping):
                raise ModelLoadError(f"{pytorch_path} does not hold a state dict")
            return dict(state_dict)
    except ModelLoadError:
        raise
    except Exception as error:  # torch and safetensors raise several unrelated types
        raise ModelLoadError(f"cannot read DNABERT weights in {directory}: {error}") from None
    raise ModelLoadError(f"{directory} holds neither {SAFETENSORS_FILE} nor {PYTORCH_FILE}")


def write_demo_model(directory: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 4,
                     intermediate: int = 128, vocab: int = 256, seed: int = 0,
                     safetensors: bool = False) -> Path:
    """Write a tiny random DNABERT-S look-alike in the published layout, for tests and demos.

    config.json with the published field names, weights with the published parameter names
    (pooler included) in pytorch_model.bin (or model.safetensors), and a BPE tokenizer.json
    trained on random DNA with DNABERT-2's special tokens and [CLS] $A [SEP] post-processor.
    All weights are random, LayerNorm included, so tests see every parameter's effect.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tokenizer = train_bpe_tokenizer(["".join(rng.choice("ACGT") for _ in range(300)) for _ in range(300)], vocab)
    tokenizer.save(str(directory / TOKENIZER_FILE))
    config = DNABERTConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=intermediate)
    (directory / CONFIG_FILE).write_text(json.dumps(_published_config_fields(config), indent=2))
    state_dict = random_state_dict(config, seed)
    if safetensors:
        save_safetensors(state_dict, str(directory / SAFETENSORS_FILE))
    else:
        torch.save(state_dict, directory / PYTORCH_FILE)
    return directory


def train_bpe_tokenizer(corpus: Sequence[str], vocab: int) -> Tokenizer:
    """A DNABERT-style BPE tokenizer ([CLS] $A [SEP], DNABERT-2's special ids) trained on
    `corpus`: for demo models and the benchmark, where the real tokenizer.json is absent."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=list("ACGTN"), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS_TOKEN} $A {SEP_TOKEN}",
        pair=f"{CLS_TOKEN} $A {SEP_TOKEN} $B:1 {SEP_TOKEN}:1",
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in (CLS_TOKEN, SEP_TOKEN)],
    )
    return tokenizer


def _published_config_fields(config: DNABERTConfig) -> dict[str, object]:
    """The field set of the published DNABERT-S config.json, with this model's sizes."""
    return {
        "_name_or_path": "zhihan1996/DNABERT-2-117M",
        "alibi_starting_size": 512,
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_bert.BertConfig",
            "AutoModel": "bert_layers.BertModel",
            "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM",
            "AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification",
        },
        "classifier_dropout": None,
        "gradient_checkpointing": False,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "layer_norm_eps": config.layer_norm_eps,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "transformers_version": "4.28.0",
        "type_vocab_size": config.type_vocab_size,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def random_state_dict(config: DNABERTConfig, seed: int) -> dict[str, Tensor]:
    """Random weights under the published names, plus the pooler the published file carries."""
    generator = torch.Generator().manual_seed(seed)
    layout = DNABERTModel(config).state_dict()
    names_and_shapes = {name: tuple(tensor.shape) for name, tensor in layout.items()}
    names_and_shapes["pooler.dense.weight"] = (config.hidden_size, config.hidden_size)
    names_and_shapes["pooler.dense.bias"] = (config.hidden_size,)
    state_dict = {}
    for name, shape in sorted(names_and_shapes.items()):
        noise = torch.randn(shape, generator=generator)
        is_layer_norm = "layernorm" in name.lower()
        if is_layer_norm and name.endswith(".weight"):
            state_dict[name] = 1.0 + 0.1 * noise
        elif is_layer_norm or name.endswith(".bias"):
            state_dict[name] = 0.1 * noise
        elif name.startswith("embeddings."):
            state_dict[name] = noise
        else:
            state_dict[name] = noise / math.sqrt(shape[-1])
    return state_dict
