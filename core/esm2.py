"""ESM-2 protein embeddings (SPEC section 4), computed on packed batches.

The transformer is our own implementation of fair-esm's `esm.model.esm2.ESM2`: the same
parameter names (so fair-esm checkpoints load strictly), the same arithmetic, but it runs
on a `PackedBatch` (no padding; rotary positions restart for every sequence) and the
attention is one function, `packed_attention`, that a GPU build can swap for a varlen kernel.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import esm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ModelLoadError
from core.packing import PackedBatch, pack, segment_ids, segment_mean

DEFAULT_BATCH_TOKENS = 4096  # tokens per packed batch when the caller gives no budget
POOLED_RESIDUES = 1024  # the published pooling averages at most this many residues
MASK_RATIO_TRAIN = 0.15 * 0.8  # fair-esm's token-dropout constant: 15% masked, 80% of them <mask>
HUB_URL = "https://dl.fbaipublicfiles.com/fair-esm/models"  # where fair-esm downloads models
DOWNLOAD_TIMEOUT_S = 60
MODEL_NAME = re.compile(r"esm2_t\d+_\d+[MB]_UR50D")
CHECKPOINT_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
# Contact-prediction weights ship in a separate file that embeddings never need.
OPTIONAL_KEYS = ("contact_head.regression.weight", "contact_head.regression.bias")


def packed_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Softmax attention within each packed sequence, never across two of them.

    q, k, v: [total, heads, head_dim], q already multiplied by head_dim**-0.5 (as fair-esm
    does before the dot product, hence scale=1 here). Returns [total, heads, head_dim].
    This CPU version runs one sequence at a time; a varlen kernel takes the same arguments.
    """
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),
            k[start:end].transpose(0, 1),
            v[start:end].transpose(0, 1),
            scale=1.0,
        ).transpose(0, 1)
    return out


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), rotating the two halves of each head as fair-esm does."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq)  # saved in fair-esm checkpoints

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: [total, heads, head_dim]; positions: [total], 0 at each sequence's first token."""
        angles = positions.float()[:, None] * self.inv_freq.float()[None, :]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat((-second, first), dim=-1)
        return x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = embed_dim // heads
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.rot_emb = RotaryEmbedding(self.head_dim)

    def forward(self, x: Tensor, positions: Tensor, cu_seqlens: Tensor) -> Tensor:
        total, width = x.shape
        q = (self.q_proj(x) * self.head_dim**-0.5).view(total, self.heads, self.head_dim)
        k = self.k_proj(x).view(total, self.heads, self.head_dim)
        v = self.v_proj(x).view(total, self.heads, self.head_dim)
        q, k = self.rot_emb(q, positions), self.rot_emb(k, positions)
        return self.out_proj(packed_attention(q, k, v, cu_seqlens).reshape(total, width))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: attention then a 4x GELU feed-forward, each added to its input."""

    def __init__(self, embed_dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(embed_dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, 4 * embed_dim)
        self.fc2 = nn.Linear(4 * embed_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor, positions: Tensor, cu_seqlens: Tensor) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), positions, cu_seqlens)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class ContactRegression(nn.Module):
    """Holds fair-esm's contact-prediction weights so parameter names match; never run here."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.regression = nn.Linear(in_features, 1)


class LanguageModelHead(nn.Module):
    """Masked-token logits, with the output projection tied to the token embedding."""

    def __init__(self, embed_dim: int, vocab_size: int, weight: nn.Parameter) -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.weight = weight
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(self.layer_norm(F.gelu(self.dense(hidden))), self.weight) + self.bias


class ESM2(nn.Module):
    """The ESM-2 transformer over packed sequences; state_dict keys are fair-esm's."""

    def __init__(
        self,
        num_layers: int,
        embed_dim: int,
        attention_heads: int,
        vocab_size: int,
        mask_idx: int,
        token_dropout: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.mask_idx = mask_idx
        self.token_dropout = token_dropout
        self.embed_tokens = nn.Embedding(vocab_size, embed_dim)
        self.layers = nn.ModuleList(TransformerLayer(embed_dim, attention_heads) for _ in range(num_layers))
        self.contact_head = ContactRegression(num_layers * attention_heads)
        self.emb_layer_norm_after = nn.LayerNorm(embed_dim)
        self.lm_head = LanguageModelHead(embed_dim, vocab_size, self.embed_tokens.weight)

    def forward(self, batch: PackedBatch) -> Tensor:
        """Hidden states of the last layer, after `emb_layer_norm_after`: [total, embed_dim]."""
        x = self.embed_tokens(batch.tokens)  # fair-esm's embed_scale is 1
        if self.token_dropout:
            x = self._rescale_masked(x, batch.tokens, batch.cu_seqlens)
        for layer in self.layers:
            x = layer(x, batch.positions, batch.cu_seqlens)
        return self.emb_layer_norm_after(x)

    def _rescale_masked(self, x: Tensor, tokens: Tensor, cu_seqlens: Tensor) -> Tensor:
        """Token dropout at inference: zero <mask> embeddings, rescale by each sequence's mask share.

        The model was trained with 12% of tokens zeroed, so embeddings are scaled by
        (1 - 0.12) / (1 - share of <mask> among that sequence's tokens, <cls>/<eos> included).
        """
        is_mask = tokens == self.mask_idx
        x = x.masked_fill(is_mask[:, None], 0.0)
        owner = segment_ids(cu_seqlens, len(tokens))
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(x.dtype)
        masked = torch.zeros_like(lengths).index_add_(0, owner, is_mask.to(x.dtype))
        return x * (1 - MASK_RATIO_TRAIN) / (1 - masked / lengths)[owner][:, None]


class ESM2Encoder:
    """ESM-2 as the pipeline uses it: proteins in, one pooled float32 vector per protein out."""

    def __init__(
        self,
        model: ESM2,
        alphabet: esm.data.Alphabet,
        device: torch.device,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
    ) -> None:
        self.model = model
        self.alphabet = alphabet
        self.device = device
        self.batch_tokens = batch_tokens

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    def tokenize(self, protein: str) -> list[int]:
        """<cls> + residues + <eos> in fair-esm's alphabet (which also reads '<mask>' as one token)."""
        try:
            residues = self.alphabet.encode(protein)
        except KeyError as error:
            raise ValueError(f"protein {protein[:30]!r} has {error.args[0]!r}, not in ESM-2's alphabet") from None
        if not residues:
            raise ValueError("cannot embed an empty protein")
        return [self.alphabet.cls_idx, *residues, self.alphabet.eos_idx]

    def embed(self, proteins: Sequence[str]) -> Tensor:
        """[len(proteins), dim] float32 on the CPU, in input order."""
        return self.embed_tokens([self.tokenize(protein) for protein in proteins])

    def embed_tokens(self, token_lists: Sequence[Sequence[int]] | Sequence[Tensor]) -> Tensor:
        """Embed already tokenized sequences (each <cls> ... <eos>), pooled as the published tool does.

        The model sees every token; the embedding is the mean over residues 1 .. min(1024, L),
        leaving out <cls> and <eos>.
        """
        out = torch.empty(len(token_lists), self.dim, dtype=torch.float32)
        with torch.inference_mode():
            for batch in pack(token_lists, self.batch_tokens):
                batch = batch.to(self.device)
                pooled = segment_mean(self.model(batch), batch.cu_seqlens, 1, 1, POOLED_RESIDUES)
                out[batch.order] = pooled.cpu()
        return out


def load_esm2(source: str, device: torch.device, batch_tokens: int | None = None) -> ESM2Encoder:
    """ESM-2 from a fair-esm checkpoint file, or from a fair-esm model name (downloaded once).

    Raises ModelLoadError, with a message meant for the user, when the source cannot be used.
    """
    checkpoint = read_checkpoint(_checkpoint_path(source))
    model = model_from_checkpoint(checkpoint, source, device)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    return ESM2Encoder(model, alphabet, device, batch_tokens or DEFAULT_BATCH_TOKENS)


def _checkpoint_path(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not MODEL_NAME.fullmatch(source):
        raise ModelLoadError(
            f"ESM-2 model {source!r}: no such file, and not a fair-esm ESM-2 model name "
            "(e.g. esm2_t36_3B_UR50D)"
        )
    cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{source}.pt"  # where fair-esm keeps it
    if not cached.is_file():
        _download(f"{HUB_URL}/{source}.pt", cached, source)
    return cached


def _download(url: str, destination: Path, name: str) -> None:
    """Fetch url to destination atomically; fails within DOWNLOAD_TIMEOUT_S when offline."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = tempfile.NamedTemporaryFile(dir=destination.parent, prefix=f".{name}.", delete=False)
    try:
        with part, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while block := response.read(1 << 24):
                part.write(block)
        os.replace(part.name, destination)
    except OSError as error:
        raise ModelLoadError(
            f"cannot download ESM-2 model {name!r} from {url} ({error}); download that file "
            f"where there is network access and pass its local path instead of the name"
        ) from None
    finally:
        Path(part.name).unlink(missing_ok=True)


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


def model_from_checkpoint(checkpoint: dict, source: str, device: torch.device) -> ESM2:
    """Size the model from cfg, load the weights strictly (contact regression may be absent), eval mode."""
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
