"""ESM-2 protein embeddings (SPEC section 4), computed on packed batches.

`ESM2` is our implementation of fair-esm's `esm.model.esm2.ESM2`: the same parameter names
(so fair-esm checkpoints load strictly) and the same arithmetic, run on a `PackedBatch` (no
padding; rotary positions restart for every sequence). Its one forward runs everywhere: in
float32 on the CPU, where it gives fair-esm's numbers, and in float16 on a GPU, compiled,
with a varlen attention kernel. The attention backend (core.attention) and whether to
compile are chosen once, by `ESM2Encoder`, and passed to the forward.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path

import esm
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core import attention as attention_module
from core.attention import Attention, Segments
from core.engine import Compiled, ConvertedWeights, compile_state, compiles, describe, finished, run_batches
from core.errors import ModelLoadError
from core.packing import PackedBatch, PreparedBatches, auto_batch_tokens, prepare_batches, segment_mean

DEFAULT_BATCH_TOKENS = 4096  # tokens per packed batch when the caller gives no budget
POOLED_RESIDUES = 1024  # the published pooling averages at most this many residues
MASK_RATIO_TRAIN = 0.15 * 0.8  # fair-esm's token-dropout constant: 15% masked, 80% of them <mask>
CHECKPOINT_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
# Contact-prediction weights ship in a separate file that embeddings never need.
OPTIONAL_KEYS = ("contact_head.regression.weight", "contact_head.regression.bias")
ESM_MAX_BATCH_TOKENS = 65536  # GEMMs are at full speed well before this many rows
ESM_BYTES_PER_TOKEN_PER_DIM = 56  # peak activation bytes per packed token, per unit of embed_dim
REFERENCE_ATTENTION = attention_module.make("per_sequence", alibi=False, device=torch.device("cpu"))
CACHE_NAME = "esm2"  # converted weights' file names begin with it (job.model_cache)

log = logging.getLogger(__name__)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """fair-esm's rotary embedding on x [total, heads, d] with cos/sin [total, 1, d]: the two
    halves of each head rotated."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def _pre_attention(x: Tensor, ln_w: Tensor, ln_b: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor,
                   b_q: Tensor, b_k: Tensor, b_v: Tensor, cos: Tensor, sin: Tensor, heads: int,
                   eps: float, q_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm, q/k/v in one GEMM, query scaling and rotary (in float32): one layer's
    attention inputs, [total, heads, head_dim] each. v stays a strided view of the GEMM's
    output (the attention kernels take any row stride): a copy of it cost 1.2% of ESM-2's
    time (benchmarks/engine_variants.py)."""
    total, width = x.shape
    h = F.layer_norm(x, (width,), ln_w, ln_b, eps)
    qkv = F.linear(h, torch.cat((w_q, w_k, w_v)), torch.cat((b_q, b_k, b_v))).view(total, 3, heads, width // heads)
    q = _rotate(qkv[:, 0].float() * q_scale, cos, sin).to(x.dtype)
    k = _rotate(qkv[:, 1].float(), cos, sin).to(x.dtype)
    return q, k, qkv[:, 2]


def _post_attention(x: Tensor, attended: Tensor, w_o: Tensor, b_o: Tensor, ln_w: Tensor, ln_b: Tensor,
                    w_1: Tensor, b_1: Tensor, w_2: Tensor, b_2: Tensor, eps: float) -> Tensor:
    """Output projection and residual, then the pre-LayerNorm GELU feed-forward and residual."""
    total, width = x.shape
    x = x + F.linear(attended.reshape(total, width), w_o, b_o)
    up = F.gelu(F.linear(F.layer_norm(x, (width,), ln_w, ln_b, eps), w_1, b_1))
    if x.dtype == torch.float32:  # fair-esm's order of additions: x + (fc2(.) + b_2)
        return x + F.linear(up, w_2, b_2)
    # In half precision, x + b_2 is the GEMM's C input (beta = 1): it comes out of the
    # LayerNorm kernel for free and saves an elementwise pass over the rows.
    return torch.addmm(x + b_2, up, w_2.t())


PRE_ATTENTION = Compiled(_pre_attention, dynamic_args=(0, 9, 10))
POST_ATTENTION = Compiled(_post_attention, dynamic_args=(0, 1))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) as fair-esm computes it; `inv_freq` stays float32
    whatever the model's dtype (it is saved in fair-esm checkpoints)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """float32 cos and sin [total, 1, head_dim] of every row's angles; positions [total]
        restart at 0 for each sequence."""
        angles = positions.float()[:, None] * self.inv_freq.float()[None, :]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return angles.cos(), angles.sin()


class SelfAttention(nn.Module):
    """One layer's q/k/v/out projections and rotary table, under fair-esm's names."""

    def __init__(self, embed_dim: int, heads: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = embed_dim // heads
        self.k_proj = nn.Linear(embed_dim, embed_dim, dtype=dtype)
        self.v_proj = nn.Linear(embed_dim, embed_dim, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, dtype=dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, dtype=dtype)
        self.rot_emb = RotaryEmbedding(self.head_dim)


class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: attention then a 4x GELU feed-forward, each added to its input."""

    def __init__(self, embed_dim: int, heads: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.self_attn = SelfAttention(embed_dim, heads, dtype)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim, dtype=dtype)
        self.fc1 = nn.Linear(embed_dim, 4 * embed_dim, dtype=dtype)
        self.fc2 = nn.Linear(4 * embed_dim, embed_dim, dtype=dtype)
        self.final_layer_norm = nn.LayerNorm(embed_dim, dtype=dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: Segments, attention: Attention,
                compile: bool) -> Tensor:
        attn, norm = self.self_attn, self.self_attn_layer_norm
        q, k, v = PRE_ATTENTION(x, norm.weight, norm.bias, attn.q_proj.weight, attn.k_proj.weight,
                                attn.v_proj.weight, attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias,
                                cos, sin, attn.heads, norm.eps, attn.head_dim**-0.5, compile=compile)
        attended = attention(q, k, v, segments, 1.0)  # q is scaled already, as fair-esm does
        norm = self.final_layer_norm
        return POST_ATTENTION(x, attended, attn.out_proj.weight, attn.out_proj.bias, norm.weight, norm.bias,
                              self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, norm.eps,
                              compile=compile)


class ContactRegression(nn.Module):
    """Holds fair-esm's contact-prediction weights so parameter names match; never run here."""

    def __init__(self, in_features: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.regression = nn.Linear(in_features, 1, dtype=dtype)


class LanguageModelHead(nn.Module):
    """Masked-token logits, with the output projection tied to the token embedding."""

    def __init__(self, embed_dim: int, vocab_size: int, weight: nn.Parameter, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim, dtype=dtype)
        self.layer_norm = nn.LayerNorm(embed_dim, dtype=dtype)
        self.weight = weight
        self.bias = nn.Parameter(torch.zeros(vocab_size, dtype=dtype))

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(self.layer_norm(F.gelu(self.dense(hidden.to(self.weight.dtype)))), self.weight) + self.bias


class ESM2(nn.Module):
    """The ESM-2 transformer over packed sequences; state_dict keys are fair-esm's.

    Parameters are created in `dtype` (float16 for the GPU: half the memory, no float32 copy);
    the rotary tables, token dropout and the final LayerNorm run in float32.
    """

    def __init__(
        self,
        num_layers: int,
        embed_dim: int,
        attention_heads: int,
        vocab_size: int,
        mask_idx: int,
        token_dropout: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.mask_idx = mask_idx
        self.token_dropout = token_dropout
        self.embed_tokens = nn.Embedding(vocab_size, embed_dim, dtype=dtype)
        self.layers = nn.ModuleList(TransformerLayer(embed_dim, attention_heads, dtype) for _ in range(num_layers))
        self.contact_head = ContactRegression(num_layers * attention_heads, dtype)
        self.emb_layer_norm_after = nn.LayerNorm(embed_dim, dtype=dtype)
        self.lm_head = LanguageModelHead(embed_dim, vocab_size, self.embed_tokens.weight, dtype)

    def forward(self, batch: PackedBatch, attention: Attention = REFERENCE_ATTENTION,
                compile: bool = False) -> Tensor:
        """float32 hidden states of the last layer, after `emb_layer_norm_after`: [total, embed_dim].

        No host-device synchronisation: `batch.bounds` carries the offsets as host ints.
        """
        bounds = batch.bounds if batch.bounds is not None else batch.cu_seqlens.tolist()
        segments = Segments(batch.cu_seqlens, bounds, batch.max_seqlen, batch.total)
        x = self.embed_tokens(batch.tokens)  # fair-esm's embed_scale is 1
        if self.token_dropout:
            x = self._rescale_masked(x, batch.tokens, segments)
        cos, sin = self.layers[0].self_attn.rot_emb.cos_sin(batch.positions)  # the same in every layer
        for layer in self.layers:
            x = layer(x, cos, sin, segments, attention, compile)
        final = self.emb_layer_norm_after
        return F.layer_norm(x.float(), (self.embed_dim,), final.weight.float(), final.bias.float(), final.eps)

    def _rescale_masked(self, x: Tensor, tokens: Tensor, segments: Segments) -> Tensor:
        """Token dropout at inference: zero <mask> embeddings, rescale by each sequence's mask share.

        The model was trained with 12% of tokens zeroed, so embeddings are scaled by
        (1 - 0.12) / (1 - share of <mask> among that sequence's tokens, <cls>/<eos> included),
        in float32.
        """
        is_mask = tokens == self.mask_idx
        owner = segments.owner()
        lengths = (segments.cu_seqlens[1:] - segments.cu_seqlens[:-1]).float()
        masked = torch.zeros_like(lengths).index_add_(0, owner, is_mask.float())
        rescaled = x.float().masked_fill(is_mask[:, None], 0.0) * (1 - MASK_RATIO_TRAIN) / (1 - masked / lengths)[owner][:, None]
        return rescaled.to(x.dtype)


def flatten_token_lists(token_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    if not len(token_lists):
        return np.zeros(0, np.int64), lengths
    flat = np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1) for t in token_lists])
    return flat, lengths


class ESM2Encoder:
    """ESM-2 as the pipeline uses it: proteins in, one pooled float32 vector per protein out.

    The attention backend is chosen once here for the device (`self.attention.name`, for the
    log), and the model runs compiled on CUDA. `prepare` (host work, thread-safe) and `run`
    (device work, no sync) let a caller overlap the two; `embed` does both.
    """

    loaded_from = "given"  # esm2_encoder and load_esm2 set it: "cache", "source", "source (cached now)" or "source (caching)", for the log

    def __init__(
        self,
        model: ESM2,
        alphabet: esm.data.Alphabet,
        device: torch.device,
        batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
        *,
        attention: str | None = None,
        compile: bool | None = None,
    ) -> None:
        self.model = model
        self.alphabet = alphabet
        self.device = device
        self.dtype = model.embed_tokens.weight.dtype
        first = model.layers[0].self_attn
        self.attention = attention_module.select(False, device, self.dtype, attention, first.heads, first.head_dim)
        self.compile = compiles(compile, device)
        self.packs = device.type == "cuda"  # one sequence per batch on the CPU: core.packing.prepare_batches
        if batch_tokens is None:
            batch_tokens = auto_batch_tokens(device, ESM_BYTES_PER_TOKEN_PER_DIM * model.embed_dim,
                                             ESM_MAX_BATCH_TOKENS, cpu_default=DEFAULT_BATCH_TOKENS)
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        self.batch_tokens = batch_tokens
        self._lookup = _lookup_table(alphabet)

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def backend(self) -> str:
        """What runs, for the log: e.g. 'float16 varlen compiled' or 'float32 per_sequence eager'."""
        return describe(self.dtype, self.attention.name, compile_state(self.compile, (PRE_ATTENTION, POST_ATTENTION)))

    def tokenize(self, protein: str) -> list[int]:
        """<cls> + residues + <eos> in fair-esm's alphabet (which also reads '<mask>' as one token)."""
        try:
            residues = self.alphabet.encode(protein)
        except KeyError as error:
            raise ValueError(f"protein {protein[:30]!r} has {error.args[0]!r}, not in ESM-2's alphabet") from None
        if not residues:
            raise ValueError("cannot embed an empty protein")
        return [self.alphabet.cls_idx, *residues, self.alphabet.eos_idx]

    def tokenize_many(self, proteins: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all proteins laid end to end, and each one's length (the same ids as
        `tokenize`); one table lookup over all the letters instead of a Python loop per letter."""
        if not proteins:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        joined = "".join(proteins)
        data = joined.encode("ascii", errors="replace")
        codes = self._lookup[np.frombuffer(data, dtype=np.uint8)]
        residues = np.fromiter((len(p) for p in proteins), dtype=np.int64, count=len(proteins))
        if len(data) != len(joined) or (codes < 0).any() or not residues.all():
            return flatten_token_lists([self.tokenize(p) for p in proteins])  # '<mask>', errors
        lengths = residues + 2
        flat = np.empty(int(lengths.sum()), dtype=np.int64)
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        inner = np.ones(len(flat), dtype=bool)
        inner[starts] = False
        inner[starts + lengths - 1] = False
        flat[starts] = self.alphabet.cls_idx
        flat[starts + lengths - 1] = self.alphabet.eos_idx
        flat[inner] = codes
        return flat, lengths

    def prepare(self, proteins: Sequence[str]) -> PreparedBatches:
        """Host work: tokenize and pack (pinned for the GPU). Safe to call from another thread."""
        return self.prepare_tokens(*self.tokenize_many(proteins))

    def prepare_tokens(self, flat: np.ndarray, lengths: np.ndarray) -> PreparedBatches:
        if len(lengths) and int(lengths.min()) < 3:
            raise ValueError("a sequence has no rows left to pool after the offsets")
        return prepare_batches(flat, lengths, self.batch_tokens, packs=self.packs, pin=self.device.type == "cuda")

    def run(self, prepared: PreparedBatches) -> tuple[Tensor, Tensor]:
        """Device work: ([n, dim] float32 embeddings, [n] bool all-finite), both on the device,
        in input order; nothing is read back to the host."""
        return run_batches(prepared, self.device, self.dim, self._pooled)

    def _pooled(self, batch: PackedBatch) -> Tensor:
        """The published pooling: the mean over residues 1 .. min(1024, L), <cls> and <eos> left out."""
        hidden = self.model(batch, self.attention, self.compile)
        return segment_mean(hidden, batch.cu_seqlens, 1, 1, POOLED_RESIDUES, validate=False)

    def warm_up(self, stop: threading.Event | None = None) -> None:
        """Compile now, so that no real batch waits on the compiler: two batches of different
        sizes, after which the one dynamic-shape graph serves every batch. Nothing to do
        when running eagerly. Returns early, between batches, once `stop` is set."""
        if not self.compile:
            return
        for count in (3, 24):
            if stop is not None and stop.is_set():
                return
            self.embed(["M" + "A" * 60] * count)

    def embed(self, proteins: Sequence[str]) -> Tensor:
        """[len(proteins), dim] float32 on the CPU, in input order."""
        return finished("ESM-2", self.run(self.prepare(proteins)))


def _lookup_table(alphabet: esm.data.Alphabet) -> np.ndarray:
    """Byte -> token id for the alphabet's one-letter tokens; -1 for anything else."""
    table = np.full(256, -1, dtype=np.int64)
    for token, index in alphabet.tok_to_idx.items():
        if len(token) == 1 and token.isascii() and not token.isspace():
            table[ord(token)] = index
    return table


def load_esm2(
    source: str,
    device: torch.device,
    batch_tokens: int | None = None,
    *,
    attention: str | None = None,
    compile: bool | None = None,
    cache: ConvertedWeights | None = None,
) -> ESM2Encoder:
    """ESM-2 from a fair-esm checkpoint file (job/models.py fetches one given by name).

    On CUDA the weights are loaded straight into fp16 and the model runs compiled;
    batch_tokens None derives the packed batch size from free GPU memory. With `cache` (keyed
    by the source's sha256) the weights as run come from its file when it holds them, without
    reading the source; otherwise they are loaded from the source and written there.
    `encoder.loaded_from` says which. Raises ModelLoadError, with a message meant for the
    user, when the source cannot be used.
    """
    model, loaded_from = load_esm2_model(source, device, cache)
    return esm2_encoder(model, loaded_from, device, batch_tokens, attention=attention, compile=compile)


def load_esm2_model(source: str, device: torch.device, cache: ConvertedWeights | None = None) -> tuple[ESM2, str]:
    """`load_esm2`'s first half: the model with its weights, and where they came from.
    Reading files and torch.nn only: no attention backend is chosen, and nothing of the
    compiler is imported beyond torch._dynamo (building a model on the meta device imports
    it), so it can run in a thread beside one that compiles once that one has imported
    torch._dynamo (core.pipeline)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = model_from_cache(cache, device, dtype) if cache is not None else None
    loaded_from = "cache" if model is not None else "source"
    if model is None:
        checkpoint = read_checkpoint(_checkpoint_path(source))
        model = model_from_checkpoint(checkpoint, source, device, dtype)
        del checkpoint
        if cache is not None and cache.write(CACHE_NAME, model.state_dict(), {"config": json.dumps(_architecture(model))}):
            loaded_from = "source (caching)" if cache.in_background else "source (cached now)"
    return model, loaded_from


def esm2_encoder(model: ESM2, loaded_from: str, device: torch.device, batch_tokens: int | None = None, *,
                 attention: str | None = None, compile: bool | None = None) -> ESM2Encoder:
    """`load_esm2`'s second half: the encoder over a loaded model, which chooses its
    attention backend (whose imports load the compiler)."""
    encoder = ESM2Encoder(model, esm.data.Alphabet.from_architecture("ESM-1b"), device, batch_tokens,
                          attention=attention, compile=compile)
    encoder.loaded_from = loaded_from
    return encoder


def _architecture(model: ESM2) -> dict[str, object]:
    """The ESM2 constructor's arguments that size `model` (stored with converted weights)."""
    return {"num_layers": len(model.layers), "embed_dim": model.embed_dim,
            "attention_heads": model.layers[0].self_attn.heads,
            "vocab_size": model.embed_tokens.num_embeddings, "mask_idx": model.mask_idx,
            "token_dropout": model.token_dropout}


def model_from_cache(cache: ConvertedWeights, device: torch.device, dtype: torch.dtype) -> ESM2 | None:
    """The model from the converted weights in `cache`, straight onto `device`; None when the
    cache has no usable file for this dtype (the reason is logged)."""
    loaded = cache.read(CACHE_NAME, dtype, device)
    if loaded is None:
        return None
    state, metadata = loaded
    try:
        with torch.device("meta"):
            model = ESM2(**json.loads(metadata["config"]), dtype=dtype)
        model.load_state_dict(state, assign=True)  # the loaded tensors become the parameters
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        log.warning("ignoring the converted weights of %s: they do not fit ESM-2 (%s)", cache.source_sha256[:12], error)
        return None
    return model.eval().requires_grad_(False)


def _checkpoint_path(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"ESM-2 model {source!r}: no such file; pass the path of a fair-esm checkpoint "
            "(e.g. esm2_t36_3B_UR50D.pt; `virnucpro run` also takes an s3:// URI or the model's name)"
        )
    return path


def read_checkpoint(path: Path) -> dict:
    """Read a fair-esm checkpoint without executing anything stored in it.

    The published file (esm2_t36_3B_UR50D.pt) is a torch.save'd dict:
    "model" maps parameter names, prefixed "encoder.sentence_encoder." (the transformer) or
    "encoder." (lm_head), to tensors; "cfg" is a dict whose "model" entry is an
    argparse.Namespace of training hyperparameters (encoder_layers, encoder_embed_dim,
    encoder_attention_heads, token_dropout, ...). torch's weights-only unpickler rebuilds
    only tensors and plain containers; the one extra global allowed here is
    argparse.Namespace, a plain attribute bag whose construction calls no code from the
    file. A file that needs any other global is refused before anything is built.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        needed = re.search(r"GLOBAL ([\w.]+)", str(error))
        if needed is None:
            raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint ({error})") from None
        raise ModelLoadError(
            f"{path}: refused: it needs the global {needed.group(1)}, which could run code when "
            "loaded; a fair-esm ESM-2 checkpoint holds only tensors, containers and argparse.Namespace"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint ({error})") from None


def model_from_checkpoint(checkpoint: dict, source: str, device: torch.device,
                          dtype: torch.dtype = torch.float32) -> ESM2:
    """Size the model from cfg, load the weights strictly (contact regression may be absent), eval mode.

    The parameters are created in `dtype` (fp16 for the GPU: half the memory, no fp32 copy).
    """
    fields = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "token_dropout")
    layout_ok = isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
    config = checkpoint.get("cfg") if layout_ok else None
    config = config.get("model") if isinstance(config, dict) else None
    if not layout_ok or not all(hasattr(config, f) for f in fields):
        raise ModelLoadError(
            f"{source}: not a fair-esm ESM-2 checkpoint: expected {{'model': state dict, "
            f"'cfg': {{'model': Namespace({', '.join(fields)}, ...)}}}}"
        )
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    with torch.device("meta"):  # no time spent initialising weights about to be overwritten
        model = ESM2(
            num_layers=config.encoder_layers,
            embed_dim=config.encoder_embed_dim,
            attention_heads=config.encoder_attention_heads,
            vocab_size=len(alphabet),
            mask_idx=alphabet.mask_idx,
            token_dropout=config.token_dropout,
            dtype=dtype,
        )
    model.to_empty(device=device)
    model.lm_head.weight = model.embed_tokens.weight  # to_empty unties them
    state = {CHECKPOINT_PREFIX.sub("", name): tensor for name, tensor in checkpoint["model"].items()}
    expected = model.state_dict()
    for name in OPTIONAL_KEYS:
        state.setdefault(name, torch.zeros(expected[name].shape))
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ModelLoadError(
            f"{source}: weights do not match an ESM-2 of this size "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ModelLoadError(f"{source}: weights do not match an ESM-2 of this size ({error})") from None
    return model.eval().requires_grad_(False)


def write_demo_checkpoint(
    path: str | os.PathLike,
    *,
    num_layers: int = 2,
    embed_dim: int = 64,
    heads: int = 4,
    seed: int = 0,
) -> None:
    """Write a tiny random ESM-2 in the published checkpoint's layout, for tests and demos.

    The weights come from fair-esm's own ESM2 (random init) with LayerNorm weights and all
    biases randomised too, saved under the real file's prefixes with cfg as an
    argparse.Namespace, so loading it goes through exactly the production path.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference = esm.model.esm2.ESM2(num_layers=num_layers, embed_dim=embed_dim, attention_heads=heads)
        state = {}
        for name, tensor in reference.state_dict().items():
            if name in OPTIONAL_KEYS:  # the published file does not include them either
                continue
            if "layer_norm" in name and name.endswith(".weight"):
                tensor = 1 + 0.1 * torch.randn_like(tensor)
            elif name.endswith(".bias"):
                tensor = 0.1 * torch.randn_like(tensor)
            prefix = "encoder." if name.startswith("lm_head.") else "encoder.sentence_encoder."
            state[prefix + name] = tensor.clone()
    config = argparse.Namespace(
        encoder_layers=num_layers,
        encoder_embed_dim=embed_dim,
        encoder_attention_heads=heads,
        token_dropout=True,
    )
    torch.save({"model": state, "cfg": {"model": config}}, path)
