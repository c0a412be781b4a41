"""Export-ready towers: open_clip's image and text encoders re-stated for ONNX and TensorRT.

The modules here reuse the model's own weights and compute the same function as
`model.encode_image` / `model.encode_text` followed by L2 normalisation, written so that the
exported graph is explicit about precision and shapes:

- LayerNorm runs in fp32 whatever the compute dtype (one LayerNormalization node with casts
  around it), and so does the attention softmax and the final normalisation: the fp16/bf16
  graphs keep the parts that overflow or lose digits in fp32, and TensorRT's strongly typed
  builder takes the precision from the graph itself.
- Attention is written out (q/k/v projection, scaled scores, masked fp32 softmax), so the
  causal text mask is an explicit Add that cannot be dropped, sliced to the batch's length.
- Batch and text length are dynamic; the text tower pools at the largest id (the end token).
- Both towers pool one token (the image's class token, the text's end token), so the last block
  computes only that token's query, attention output and MLP (keys and values from every
  token): the same features, with about 7% fewer multiply-adds on ViT-B/32.
- Optionally the image tower takes uint8 (B, H, W, 3) pixels and folds the CLIP normalisation
  into one multiply-add per channel.

The torch engine's `--fused` towers are these modules built with attention="sdpa": attention
through F.scaled_dot_product_attention (flash kernels on CUDA) and LayerNorms in the tower's
dtype (PyTorch's kernels keep their statistics in fp32), for speed rather than an explicit graph.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from fklip.data.archive import CLIP_MEAN, CLIP_STD
from fklip.errors import ConfigError
from fklip.precision import EXPORT, check_precision
from fklip.runner import weight_dtype

ATTENTIONS = ("explicit", "sdpa")
# A finite stand-in for -inf in the causal mask: exp() of it underflows to exactly 0 in fp32,
# like -inf, without relying on every runtime's handling of infinities.
MASK_VALUE = -1e9


class Fp32LayerNorm(nn.Module):
    """LayerNorm computed in fp32 on an input of any dtype; the result is cast back."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        self.weight = nn.Parameter(ln.weight.detach().float().clone())
        self.bias = nn.Parameter(ln.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.to(x.dtype)


def _layer_norm(ln: nn.LayerNorm, attention: str) -> nn.Module:
    """For ONNX ("explicit"): an Fp32LayerNorm, fp32 written into the graph. For the torch engine
    ("sdpa"): the LayerNorm itself, cast with the tower (PyTorch's kernels keep the statistics in
    fp32 for fp16/bf16 inputs), which saves the fp32 copies of the activations around each norm."""
    return Fp32LayerNorm(ln) if attention == "explicit" else copy.deepcopy(ln)


class ExportAttention(nn.Module):
    """nn.MultiheadAttention (batch first, self-attention) with the softmax in fp32.

    attention="explicit" writes the attention out (for ONNX: an explicit mask Add, an fp32
    softmax); "sdpa" calls F.scaled_dot_product_attention (fused flash or memory-efficient kernels
    on CUDA, which keep the softmax in fp32 internally), causal where a mask is given: the torch
    engine's `--fused` towers."""

    def __init__(self, mha: nn.MultiheadAttention, attention: str = "explicit", split: bool = False):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ConfigError(f"attention: expected one of {', '.join(ATTENTIONS)}, got {attention!r}")
        self.sdpa = attention == "sdpa"
        if not mha.batch_first or not mha._qkv_same_embed_dim or mha.in_proj_bias is None:
            raise ConfigError("export: only batch-first self-attention with biases is supported")
        self.heads = mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        width, weight, bias = mha.embed_dim, mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
        # split: the query and the key/value projections as two weights (the last block's, whose
        # query is one token): ONNX sees two plain initializers that `--int8` quantises, not
        # slices of one computed at run time
        self.split = split
        names = (("q_proj", 0, width), ("kv_proj", width, 3 * width)) if split else (("in_proj", 0, 3 * width),)
        for name, start, stop in names:
            linear = nn.Linear(width, stop - start)
            linear.weight = nn.Parameter(weight[start:stop].clone())
            linear.bias = nn.Parameter(bias[start:stop].clone())
            setattr(self, name, linear)
        self.out_proj = copy.deepcopy(mha.out_proj)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.split:
            qkv = torch.cat([self.q_proj(x), self.kv_proj(x)], dim=-1)
        else:
            qkv = self.in_proj(x)
        qkv = self._heads(qkv, 3)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        if self.sdpa:  # a mask here is always the causal one (TextTower)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=mask is not None)  # (B, H, L, Dh)
            return self.out_proj(out.transpose(1, 2).flatten(2))
        return self.out_proj(self._explicit(q, k, v, mask))

    def attend_one(self, x: torch.Tensor, xq: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention output for one query per sample, `xq` (B, 1, W), over the keys and
        values of all of `x` (B, L, W); `mask` (B, 1, 1, L) fp32 0 / MASK_VALUE, or None.
        Projects the query of that one token only, not of all L (needs split=True)."""
        q = self._heads(self.q_proj(xq), 1)[:, :, 0].transpose(1, 2)  # (B, H, 1, Dh)
        kv = self._heads(self.kv_proj(x), 2)  # (B, L, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        if self.sdpa:
            keep = None if mask is None else mask == 0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, 1, Dh)
            return self.out_proj(out.transpose(1, 2).flatten(2))
        return self.out_proj(self._explicit(q, k, v, mask))

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, L, n*W) -> (B, L, n, H, Dh). A reshape on the traced batch and length, not
        unflatten(-1, ...): the tracer writes that one's negative dim as a Mod node on
        constants, which onnxruntime folds but older TensorRT parsers do not import."""
        return x.reshape(x.shape[0], x.shape[1], n, self.heads, self.head_dim)

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """Scaled scores, fp32 masked softmax, weighted values -> (B, Lq, W) before out_proj."""
        scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)  # (B, H, Lq, L)
        scores = scores.float()
        if mask is not None:
            scores = scores + mask  # fp32, 0 or MASK_VALUE, broadcast to the scores
        attn = scores.softmax(dim=-1).to(v.dtype)
        return (attn @ v).transpose(1, 2).flatten(2)  # (B, Lq, W)


class ExportBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (pre-norm attention and MLP, optional LayerScale)."""

    def __init__(self, block, attention: str = "explicit", last: bool = False):
        super().__init__()
        if hasattr(block, "ln_1_kv"):
            raise ConfigError("export: cross-attention blocks are not supported")
        self.ln_1 = _layer_norm(block.ln_1, attention)
        self.attn = ExportAttention(block.attn, attention, split=last)
        self.ls_1 = copy.deepcopy(block.ls_1)
        self.ln_2 = _layer_norm(block.ln_2, attention)
        self.mlp = copy.deepcopy(block.mlp)
        self.ls_2 = copy.deepcopy(block.ls_2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))

    def forward_one(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output (B, W) at one token per sample: the first (rows None) or, for
        x (B, L, W), the rows `rows` (B,) of x.flatten(0, 1). The towers pool one token, so their
        last block needs only that token's query, attention output and MLP (keys and values still
        come from every token); `mask` (B, 1, 1, L) is that token's row of the attention mask."""
        h = self.ln_1(x)
        if rows is None:
            xq, hq = x[:, :1], h[:, :1]  # (B, 1, W)
        else:
            xq = x.flatten(0, 1).index_select(0, rows).unsqueeze(1)
            hq = h.flatten(0, 1).index_select(0, rows).unsqueeze(1)
        xq = xq + self.ls_1(self.attn.attend_one(h, hq, mask))
        # [:, 0], not squeeze(1): the tracer cannot prove that dim is 1 and writes an If node
        # whose branches differ in rank, which TensorRT's ONNX parser refuses
        return (xq + self.ls_2(self.mlp(self.ln_2(xq))))[:, 0]


def _blocks(transformer, attention: str, one_token_last: bool) -> nn.ModuleList:
    """The transformer's blocks; with one_token_last, the last one ready for `forward_one`."""

    if not transformer.batch_first:
        raise ConfigError("export: only batch-first transformers are supported")
    for block in transformer.resblocks:
        if type(block) is not ResidualAttentionBlock:
            raise ConfigError(f"export: unsupported block type {type(block).__name__}")
    last = len(transformer.resblocks) - 1 if one_token_last else -1
    return nn.ModuleList(ExportBlock(b, attention, last=i == last) for i, b in enumerate(transformer.resblocks))


def _normalized(emb: torch.Tensor) -> torch.Tensor:
    emb = emb.float()
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ImageTower(nn.Module):
    """Pixels -> L2-normalised image embedding (B, D) float32 (open_clip's VisionTransformer)."""

    def __init__(self, visual, precision: str = "fp32", uint8_input: bool = False,
                 attention: str = "explicit"):
        super().__init__()

        if type(visual) is not VisionTransformer:
            raise ConfigError(f"export: unsupported image tower {type(visual).__name__}; "
                              "fklip exports open_clip VisionTransformer towers")
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise ConfigError("export: attention pooling is not supported")
        if visual.output_tokens:
            raise ConfigError("export: towers that output tokens are not supported")
        self.dtype = weight_dtype(precision)
        self.uint8_input = uint8_input
        self.pool_type = visual.pool_type
        self.final_ln_after_pool = visual.final_ln_after_pool
        conv = visual.conv1  # (W, 3, p, p) with stride p
        # ONNX: the patch embedding as one MatMul over flattened patches, which `--int8` quantises
        # (a Conv stays fp32: the int8 image graph runs 4.5% faster this way, RESULTS.md), and
        # which needs no bf16 Conv (ONNX has none before opset 22). The torch engine keeps the conv.
        self.patch_matmul = attention == "explicit"
        if self.patch_matmul:
            if conv.bias is not None or conv.stride != conv.kernel_size or conv.padding not in ((0, 0), 0):
                raise ConfigError("export: the patch embedding must be a bias-free conv with stride = kernel")
            self.patch = conv.kernel_size[0]
            self.patch_weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).t().clone())
        else:
            self.conv1 = copy.deepcopy(conv)
        self.class_embedding = nn.Parameter(visual.class_embedding.detach().clone())
        self.positional_embedding = nn.Parameter(visual.positional_embedding.detach().clone())
        self.ln_pre = _layer_norm(visual.ln_pre, attention) if isinstance(visual.ln_pre, nn.LayerNorm) else nn.Identity()
        self.blocks = _blocks(visual.transformer, attention, one_token_last=self.pool_type == "tok")
        self.ln_post = _layer_norm(visual.ln_post, attention)
        self.proj = nn.Parameter(visual.proj.detach().clone()) if visual.proj is not None else None
        # uint8 pixels: x / 255 then (x - mean) / std, folded into x * scale + shift (fp32)
        std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)
        _cast_except_layernorm(self, self.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.uint8_input:
            # (B, H, W, 3) uint8 -> (B, 3, H, W) normalised fp32; cast first: TensorRT takes
            # uint8 only as a network input into a Cast (no uint8 Transpose)
            pixels = pixels.float().permute(0, 3, 1, 2) * self.pixel_scale + self.pixel_shift
        return self.embed(pixels)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) pixels -> L2-normalised (B, D) float32."""
        if self.patch_matmul:
            p, g = self.patch, pixels.shape[-1] // self.patch
            x = pixels.to(self.dtype).reshape(-1, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, 3, p, p)
            x = x.reshape(-1, g * g, 3 * p * p) @ self.patch_weight  # (B, g*g, W)
        else:
            x = self.conv1(pixels.to(self.dtype)).flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (B, 1 + g*g, W)
        x = self.ln_pre(x)
        if self.pool_type == "tok":  # LayerNorm is per token: pooling before or after ln_post agrees
            for block in self.blocks[:-1]:
                x = block(x)
            x = self.ln_post(self.blocks[-1].forward_one(x))  # (B, W), the class token only
        else:
            for block in self.blocks:
                x = block(x)
            if self.final_ln_after_pool:
                x = self.ln_post(self._pool(x))
            else:
                x = self._pool(self.ln_post(x))  # (B, W)
        if self.proj is not None:
            x = x @ self.proj  # (B, D)
        return _normalized(x)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.pool_type == "tok" else x[:, 1:].mean(dim=1)


class TextTower(nn.Module):
    """Token ids (B, L) -> L2-normalised text embedding (B, D) float32 (open_clip's CLIP text)."""

    def __init__(self, model, precision: str = "fp32", attention: str = "explicit"):
        super().__init__()

        if type(model) is not CLIP:
            raise ConfigError(f"export: unsupported text tower in {type(model).__name__}; "
                              "fklip exports CLIP-style text towers")
        if model.text_pool_type != "argmax" or model.attn_mask is None:
            raise ConfigError("export: the text tower must be causal and pool at the end token")
        self.dtype = weight_dtype(precision)
        self.token_embedding = copy.deepcopy(model.token_embedding)
        self.positional_embedding = nn.Parameter(model.positional_embedding.detach().clone())
        self.blocks = _blocks(model.transformer, attention, one_token_last=True)
        self.ln_final = _layer_norm(model.ln_final, attention)
        proj = model.text_projection
        if isinstance(proj, nn.Linear):
            raise ConfigError("export: linear text projections are not supported")
        self.text_projection = nn.Parameter(proj.detach().clone()) if proj is not None else None
        n = model.positional_embedding.shape[0]
        causal = torch.full((n, n), MASK_VALUE, dtype=torch.float32).triu_(1)  # (n, n) 0 on and below
        self.register_buffer("mask", causal, persistent=False)
        _cast_except_layernorm(self, self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]  # (B, L, W)
        mask = self.mask[:length, :length]
        # pool at the largest id (the end token); ids < 2**24 are exact in fp32
        pool = ids.float().argmax(dim=-1)  # (B,)
        rows = torch.arange(ids.shape[0], device=ids.device) * length + pool  # (B,) rows of (B * L, W)
        for block in self.blocks[:-1]:
            x = block(x, mask)
        # the last block at the end token only; LayerNorm is per token, so pooling first agrees
        x = self.blocks[-1].forward_one(x, rows, mask.index_select(0, pool)[:, None, None, :])
        x = self.ln_final(x)  # (B, W)
        if self.text_projection is not None:
            x = x @ self.text_projection  # (B, D)
        return _normalized(x)


def _cast_except_layernorm(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters to `dtype`, except the fp32 LayerNorms' and buffers (mask, pixel folding)."""
    keep = {id(p) for m in module.modules() if isinstance(m, Fp32LayerNorm) for p in m.parameters()}
    for p in module.parameters():
        if id(p) not in keep:
            p.data = p.data.to(dtype)


def build_towers(model, precision: str = "fp32", uint8_input: bool = False,
                 attention: str = "explicit") -> dict[str, nn.Module]:
    """{"image": ImageTower, "text": TextTower} in eval mode on the CPU."""
    check_precision(precision, EXPORT)
    model = model.float().cpu().eval()
    towers = {"image": ImageTower(model.visual, precision, uint8_input, attention),
              "text": TextTower(model, precision, attention)}
    return {name: tower.eval() for name, tower in towers.items()}
