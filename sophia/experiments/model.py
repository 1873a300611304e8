r"""
---
title: A small GPT to train with Sophia
summary: A decoder-only transformer in one file - embeddings, pre-norm blocks with causal self-attention and a GELU MLP, a weight-tied head - and its parameter groups.
---

Sophia was made for language-model pre-training, so this package trains a language
model to show it: a decoder-only transformer in the style of Karpathy's
[nanoGPT](https://github.com/karpathy/nanoGPT) (`model.py`), small enough to train on
two CPU cores in a few minutes, and with a bigger configuration for a GPU. The
[training loop](train.html) feeds it batches from the [corpus](data.html).

The model, from bottom to top:

* token embeddings plus learned position embeddings;
* `n_layer` pre-norm blocks, each
  $x \leftarrow x + \operatorname{Attn}(\operatorname{LN}(x))$, then
  $x \leftarrow x + \operatorname{MLP}(\operatorname{LN}(x))$, with causal multi-head
  self-attention and a GELU MLP wider than the model;
* a final LayerNorm and a linear head that shares its weight with the token embedding.

Shapes are written as `(B, T, C)`: $B$ sequences in the batch, $T$ positions per
sequence, $C$ = `n_embd` channels; `V` is the vocabulary size, `H` the number of
heads. Note that this $B$ is the batch of sequences; the number of predictions per
step that Sophia calls $B$ (the optimizer's `bs`) is $B \times T$ here.

`forward(idx, targets)` returns the logits of every position, not only the last one:
the [Gauss-Newton-Bartlett estimator](../hessian.html) samples a label for every
prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GPTConfig", "GPT"]

# The hidden layer of the MLP is this many times wider than the model (GPT-2's choice).
MLP_EXPANSION = 4

# The standard deviation of the initial weights (GPT-2's choice).
INIT_STD = 0.02


# ## Configuration
#
# The default is the model the [training loop](train.html) trains on a laptop CPU: a
# byte-level vocabulary (every byte value is a token, so any text works and nothing
# needs a tokenizer), a few narrow blocks, and a context of `block_size` bytes. That is
# about 0.8 M parameters, small enough that a training step takes tens of
# milliseconds on two CPU cores. `GPTConfig.gpu()` is nanoGPT's character-level
# Shakespeare model (about 10 M parameters), for a GPU.
#
# Every field is checked when the configuration is made, so a model that cannot be
# built fails here, with the field named, not deep inside a matrix multiplication.
@dataclass
class GPTConfig:
    r"""Sizes of the GPT: vocabulary, context length, depth, heads, width, dropout."""

    # `vocab_size` is $V$, the number of distinct tokens (rows of the embedding, columns
    # of the logits); `block_size` the longest sequence the model can read, which is
    # the number of rows of the position embedding.
    vocab_size: int = 256
    block_size: int = 64
    # `n_layer` blocks deep, `n_head` heads per attention layer, `n_embd` = $C$
    # channels wide. Each head works in $C/H$ channels of its own.
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    # Dropout is off by default: a model this small does not overfit in a few hundred
    # steps, and its masks would add noise to the comparison of optimizers.
    dropout: float = 0.0
    # Biases in the linear layers and LayerNorms, as in GPT-2. nanoGPT notes that
    # without them a model is a little better and faster; we keep GPT-2's form.
    bias: bool = True

    # `bool` is a subclass of `int`, so `n_layer=True` is refused explicitly.
    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"GPTConfig.{name} must be a positive int, got {value!r}"
                )
            if value < 1:
                raise ValueError(
                    f"GPTConfig.{name} must be a positive int, got {value!r}"
                )
        # Every head gets an equal slice of the channels.
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                "GPTConfig.n_embd must be divisible by n_head, got "
                f"n_embd={self.n_embd} and n_head={self.n_head}"
            )
        # A probability of one would zero every activation: the interval is open at 1.
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(
                f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}"
            )
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be a bool, got {self.bias!r}")

    # The GPU model keeps the byte vocabulary and changes only the sizes below; any of
    # them, or any other field, can be overridden by keyword.
    @classmethod
    def gpu(cls, **overrides) -> GPTConfig:
        r"""nanoGPT's character-level Shakespeare model (about 10 M parameters), for a
        GPU; `overrides` change fields."""
        sizes = dict(block_size=256, n_layer=6, n_head=6, n_embd=384)
        sizes.update(overrides)
        return cls(**sizes)

    # Unlike `dataclasses.replace`, a misspelt field gets a message that names it; the
    # copy goes through `__init__`, so `__post_init__` checks it again.
    def replace(self, **changes) -> GPTConfig:
        r"""A copy with some fields changed (and checked again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"GPTConfig has no field(s) {sorted(unknown)}")
        return GPTConfig(
            **{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes}
        )


# ## Causal self-attention
#
# Each head $i$ projects the input to queries, keys and values,
# $Q_i = xW^Q_i$, $K_i = xW^K_i$, $V_i = xW^V_i$, and mixes the values of the
# positions up to and including its own:
# $$\operatorname{head}_i = \operatorname{softmax}\!\Big(
#   \frac{Q_i K_i^\top}{\sqrt{C/H}} + M\Big) V_i ,$$
# where the mask $M$ is $-\infty$ above the diagonal, so position $t$ never sees a
# position after it: the prediction of token $t+1$ may only use tokens $1..t$. The heads
# are concatenated and projected back to $C$ channels.
#
# Why divide by $\sqrt{d}$, with $d = C/H$ the width of a head: if the entries of a
# query and a key are roughly independent with unit variance, their dot product is a
# sum of $d$ such products and has variance $d$. Without the scale, wide heads would
# feed the softmax logits of size $\sqrt d$, it would saturate (one position takes all
# the weight) and its gradient would vanish. Dividing by $\sqrt d$ keeps the scores of
# order one, whatever the width.
class CausalSelfAttention(nn.Module):
    r"""Multi-head self-attention in which every position attends only to itself and
    the past."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # One matrix for the three projections $W^Q, W^K, W^V$ of all heads.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # The output projection $W^O$, which mixes the concatenated heads. It writes
        # into the residual stream, which is why its initialization is scaled down
        # (see "Initialization" below).
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        r"""Attend over `x`, `(B, T, C)`, causally; return `(B, T, C)`."""
        batch, time, channels = x.shape
        head_size = channels // self.n_head
        # The queries, keys and values of all heads, each `(B, T, C)`, then split into
        # heads as `(B, H, T, C/H)`.
        q, k, v = self.c_attn(x).split(channels, dim=2)
        q = q.view(batch, time, self.n_head, head_size).transpose(1, 2)
        k = k.view(batch, time, self.n_head, head_size).transpose(1, 2)
        v = v.view(batch, time, self.n_head, head_size).transpose(1, 2)
        # The masked softmax attention above, `(B, H, T, C/H)`, in one call with the
        # scale $1/\sqrt{C/H}$ and `is_causal=True`. Its fused kernels cannot be
        # differentiated twice, so Sophia-H runs it under the math backend (see
        # [the estimators](../hessian.html#kernels-with-no-second-derivative)).
        #
        # `dropout_p` is a plain argument, not a module that `model.eval()` turns off,
        # hence the test on `self.training`.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        # The heads side by side again, `(B, T, C)`, and the output projection;
        # `view` needs the transposed tensor made `contiguous()` first.
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.resid_dropout(self.c_proj(y))


# ## The MLP
#
# Position by position, a two-layer perceptron whose hidden layer is `MLP_EXPANSION`
# times wider than the model:
# $$\operatorname{MLP}(x) = \operatorname{GELU}(x W_1 + b_1)\, W_2 + b_2 .$$
# Attention moves information between positions; the MLP transforms it at each
# position, and holds most of a block's parameters ($2 \cdot$ `MLP_EXPANSION`
# $\cdot C^2$ of its weights, against $4C^2$ for attention). GELU,
# $x\,\Phi(x)$ with $\Phi$ the normal CDF, is a smooth ReLU; `F.gelu` computes it
# exactly, where GPT-2 used a tanh approximation of it.
class MLP(nn.Module):
    r"""The position-wise feed-forward network of a block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(
            config.n_embd, MLP_EXPANSION * config.n_embd, bias=config.bias
        )
        self.c_proj = nn.Linear(
            MLP_EXPANSION * config.n_embd, config.n_embd, bias=config.bias
        )
        self.dropout = nn.Dropout(config.dropout)

    # `(B, T, C)` up to the hidden width, GELU, back down to `(B, T, C)`.
    def forward(self, x: Tensor) -> Tensor:
        r"""Apply the MLP to every position of `x`, `(B, T, C)`."""
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


# ## A block
#
# Pre-norm residual blocks (GPT-2): the LayerNorm is applied to the input of each
# sub-layer, not to the residual stream, so the stream itself is a plain sum and
# gradients reach the bottom blocks undisturbed:
# $$x \leftarrow x + \operatorname{Attn}(\operatorname{LN}_1(x)), \qquad
#   x \leftarrow x + \operatorname{MLP}(\operatorname{LN}_2(x)).$$
# The original transformer normalized *after* the sum,
# $x \leftarrow \operatorname{LN}(x + \operatorname{Attn}(x))$, which puts a
# normalization on the path of every gradient and needs a careful learning-rate
# warm-up to train at all (Xiong et al., 2020).
# $\operatorname{LN}(x) = \gamma \odot (x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta$,
# with the mean $\mu$ and variance $\sigma^2$ over the $C$ channels of one position.
class Block(nn.Module):
    r"""One transformer block: attention, then the MLP, each on a normalized input,
    each added to the stream."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    # The two residual updates, each `(B, T, C)` to `(B, T, C)`.
    def forward(self, x: Tensor) -> Tensor:
        r"""One block on the residual stream `x`, `(B, T, C)`."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# ## The model
#
# The modules, under nanoGPT's names so that its checkpoints and readers find their
# way: `wte` the token embedding ($V \times C$), `wpe` the position embedding
# (`block_size` $\times C$), `h` the blocks, `ln_f` the final LayerNorm. The pre-norm
# blocks never normalize the stream itself, so it is normalized once more before the
# head reads it.
class GPT(nn.Module):
    r"""A decoder-only transformer language model; `forward(idx, targets=None)`
    returns `(logits, loss)`."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        # The head has no bias: its weight is the embedding matrix, which has none.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press and Wolf, 2017): the head that turns a vector into
        # logits is the transpose of the embedding that turns a token into a vector,
        # $\text{logits} = \operatorname{LN}(x)\, W_{te}^\top$. One matrix, one
        # parameter: the optimizer sees it once, its gradient the sum of both uses.
        #
        # For Sophia this means one momentum and one Hessian estimate for the matrix,
        # both of the summed gradient, which is what the loss as a function of that one
        # matrix calls for. It also saves $V \times C$ parameters, a large share of a
        # model this small.
        self.lm_head.weight = self.transformer.wte.weight

        # ### Initialization
        #
        # GPT-2's: every weight matrix and embedding from $\mathcal N(0, \sigma^2)$
        # with $\sigma$ = `INIT_STD`, biases at zero, and the projections that write
        # into the residual stream (`c_proj`) scaled down by $\sqrt{2 n_\text{layer}}$,
        # because each block adds two of them to the stream and the variance of a sum
        # grows with the number of terms. With small weights the logits start near
        # zero, the predicted distribution near uniform, and the loss near $\ln V$.
        #
        # `apply` visits the tied matrix twice (as `wte` and as `lm_head`) and draws it
        # twice; the second draw stands, and it has the same distribution. LayerNorms
        # keep PyTorch's initialization, $\gamma = 1$ and $\beta = 0$: the identity
        # after normalization.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(
                    p, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer)
                )

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # `parameters()` yields a shared tensor once, so the tied matrix is counted once.
    # nanoGPT's "non-embedding" count leaves out the position embedding only: the
    # token embedding is also the head, and does work at the top of the model.
    def num_params(self, non_embedding: bool = False) -> int:
        r"""The number of parameters (the tied matrix once); without the position
        embedding if `non_embedding`."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    # ### Forward
    #
    # `idx` holds token ids, `(B, T)` with $T \le$ `block_size`. The logits of every
    # position come back, `(B, T, V)`, and with `targets` (the same shape as `idx`:
    # the next token at every position) the mean cross-entropy over all $B \times T$
    # predictions,
    # $$L = -\frac{1}{BT} \sum_{b, t} \log p_\theta(y_{b,t} \mid x_{b, \le t}) .$$
    # The logarithm is natural, so $L$ is in nats per token; $e^{L}$ is the
    # perplexity, the number of equally likely tokens the model is, on average, as
    # uncertain as. A model that knows nothing predicts the uniform distribution and
    # scores $L = \ln V$, perplexity $V$.
    #
    # The checks come first: a sequence longer than `block_size` would index past the
    # position embedding; an empty one would give a mean over nothing, a NaN.
    def forward(
        self, idx: Tensor, targets: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        r"""Logits `(B, T, V)` for token ids `idx` `(B, T)`, and the mean cross-entropy
        against `targets` if given."""
        if not isinstance(idx, Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(
                "GPT.forward: idx must be a (batch, time) tensor of token ids, got "
                f"{shape}"
            )
        if idx.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
            raise ValueError(
                f"GPT.forward: idx must hold integer token ids, got dtype {idx.dtype}"
            )
        batch, time = idx.shape
        if time > self.config.block_size:
            raise ValueError(
                f"GPT.forward: sequence length {time} is longer than "
                f"block_size={self.config.block_size}"
            )
        if time == 0:
            raise ValueError(
                "GPT.forward: sequence length 0; give at least one token per sequence"
            )
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(
                "GPT.forward: targets must have the shape of idx "
                f"{tuple(idx.shape)}, got {tuple(targets.shape)}"
            )

        # Token ids may arrive as any integer type (a corpus of bytes is `uint8`);
        # the embedding lookup wants `int64`.
        idx = idx.long()
        # Positions $0..T-1$, `(T,)`.
        pos = torch.arange(time, dtype=torch.long, device=idx.device)
        # Token plus position embeddings, `(B, T, C)` (the `(T, C)` positions broadcast
        # over the batch).
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        # The residual stream through every block, `(B, T, C)` in and out.
        for block in self.transformer.h:
            x = block(x)
        # The final LayerNorm, `(B, T, C)`.
        x = self.transformer.ln_f(x)
        # The logits, `(B, T, V)`.
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        # `F.cross_entropy` wants one row of logits per prediction, `(BT, V)`, and one
        # target per prediction, `(BT,)`; its default reduction is the mean over the
        # $BT$ rows, the $\frac{1}{BT}\sum$ above. It applies `log_softmax` itself,
        # which is more accurate than taking the log of a softmax.
        loss = F.cross_entropy(
            logits.reshape(batch * time, -1), targets.reshape(-1).long()
        )
        return logits, loss

    # ## Parameter groups
    #
    # Weight decay pulls the matrices of the linear layers (attention, MLP) towards
    # zero, and nothing else: not the biases and LayerNorm gains (shrinking a gain
    # only rescales a layer the next one must undo), and not the embeddings, token
    # and position, hence not the head tied to the token embedding. That is the rule
    # of the authors' `model.py` (the nanoGPT of their time), which `train_sophiag.py`
    # trains: only `nn.Linear` weights decay, and the tied matrix counts as the
    # embedding it is. The groups are plain dictionaries that `torch.optim.AdamW`,
    # `SophiaG` and `SophiaH` all take, and all of them decay the decoupled way of
    # Algorithm 3's line 11, $\theta \leftarrow (1 - \eta_t\lambda)\,\theta$, so
    # $\lambda$ = `weight_decay` acts the same under each.
    def param_groups(self, weight_decay: float) -> list[dict]:
        r"""Two parameter groups: the `nn.Linear` weights (the tied head excepted)
        with `weight_decay`, the rest with none."""
        if (
            isinstance(weight_decay, bool)
            or not isinstance(weight_decay, (int, float))
            or not (math.isfinite(weight_decay) and weight_decay >= 0)
        ):
            raise ValueError(
                f"weight_decay must be a finite number >= 0, got {weight_decay!r}"
            )
        modules = list(self.modules())
        embeddings = {id(m.weight) for m in modules if isinstance(m, nn.Embedding)}
        linear = {id(m.weight) for m in modules if isinstance(m, nn.Linear)}
        decayed = linear - embeddings
        # Frozen parameters stay out: an optimizer would keep state for them unused.
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {
                "params": [p for p in params if id(p) in decayed],
                "weight_decay": weight_decay,
            },
            {
                "params": [p for p in params if id(p) not in decayed],
                "weight_decay": 0.0,
            },
        ]
