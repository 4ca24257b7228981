"""Small transformer models written the way users write them, for the
transformer tests (random weights, eval mode). Each takes int64 token ids
[batch, seq] and is cut into stages by pipe_split() (cut=True) or by a
split_spec (`SPLIT_SPECS`).

  gpt2:  GPT-2 style: token + position embeddings (arange), pre-norm blocks
         with a fused qkv linear split three ways, an MLP of Conv1D (addmm)
         layers, a causal-mask buffer
         sliced to the sequence, masked_fill, softmax, tanh-GELU MLP written
         out, and an lm_head tied to the token embedding (an alias across
         the first and last stage). Returns (logits, last hidden state).
  encoder: a torch.nn.TransformerEncoder classifier (BERT style: token
         embeddings, 3 post-norm layers with GELU, batch_first) taking a
         bool padding mask [batch, seq] (True = padding) besides the ids;
         mean over the sequence, a linear head. Cut by pipe_split() after
         the embedding and by split_spec at layers.2.
  llama: Llama style: RMSNorm (pow, mean keepdim, rsqrt), rotary position
         embeddings from cos/sin buffers, grouped-query attention (2 KV heads
         for 4 query heads, via expand/reshape), a causal mask from triu and
         torch.where, a SwiGLU MLP, lm_head tied to the embedding.
"""
import math

import torch
import torch.nn.functional as F

import pipeserve


class GptAttention(torch.nn.Module):
    def __init__(self, d, heads, max_len):
        super().__init__()
        self.c_attn = torch.nn.Linear(d, 3 * d)
        self.c_proj = torch.nn.Linear(d, d)
        self.heads = heads
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len))
                             .view(1, 1, max_len, max_len))

    def heads_of(self, x, B, T, C):
        """q, k, v of x [B, T, C] as [B, heads, T, head_dim]."""
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.heads
        return tuple(t.view(B, T, self.heads, hs).transpose(1, 2) for t in (q, k, v))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.heads_of(x, B, T, C)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Conv1D(torch.nn.Module):
    """GPT-2's (Hugging Face's) linear layer: weight [in, out], addmm."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GptMlp(torch.nn.Module):
    def __init__(self, d, conv1d=True):
        super().__init__()
        layer = (lambda n_in, n_out: Conv1D(n_out, n_in)) if conv1d else torch.nn.Linear
        self.c_fc = layer(d, 4 * d)
        self.c_proj = layer(4 * d, d)

    def forward(self, x):
        h = self.c_fc(x)
        # GPT-2's gelu, written out.
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) *
                                        (h + 0.044715 * torch.pow(h, 3.0))))
        return self.c_proj(h)


class GptBlock(torch.nn.Module):
    def __init__(self, d, heads, max_len, conv1d=True):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(d)
        self.attn = GptAttention(d, heads, max_len)
        self.ln_2 = torch.nn.LayerNorm(d)
        self.mlp = GptMlp(d, conv1d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Gpt2(torch.nn.Module):
    def __init__(self, vocab=97, d=32, heads=4, layers=4, max_len=24, cut=True,
                 conv1d=True):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.wpe = torch.nn.Embedding(max_len, d)
        self.h = torch.nn.ModuleList(GptBlock(d, heads, max_len, conv1d)
                                     for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: an alias
        self.cut = cut

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for i, block in enumerate(self.h):
            if self.cut and i in (1, 3):
                pipeserve.pipe_split()
            x = block(x)
        x = self.ln_f(x)
        return self.lm_head(x), x


class RmsNorm(torch.nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAttention(torch.nn.Module):
    def __init__(self, d, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.q_proj = torch.nn.Linear(d, d, bias=False)
        self.k_proj = torch.nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = torch.nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = torch.nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k = k[:, :, None, :, :].expand(B, self.kv_heads, rep, T, self.hd) \
            .reshape(B, self.heads, T, self.hd)
        v = v[:, :, None, :, :].expand(B, self.kv_heads, rep, T, self.hd) \
            .reshape(B, self.heads, T, self.hd)
        att = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.hd)
        att = att + mask
        att = F.softmax(att.float(), dim=-1).type_as(q)
        y = torch.matmul(att, v).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)


class LlamaMlp(torch.nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, hidden, bias=False)
        self.up_proj = torch.nn.Linear(d, hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(torch.nn.Module):
    def __init__(self, d, heads, kv_heads, hidden):
        super().__init__()
        self.input_layernorm = RmsNorm(d)
        self.self_attn = LlamaAttention(d, heads, kv_heads)
        self.post_attention_layernorm = RmsNorm(d)
        self.mlp = LlamaMlp(d, hidden)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(torch.nn.Module):
    def __init__(self, vocab=89, d=32, heads=4, kv_heads=2, hidden=48,
                 layers=3, max_len=20, cut=True, tie=True):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(LlamaLayer(d, heads, kv_heads, hidden)
                                          for _ in range(layers))
        self.norm = RmsNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight
        hd = d // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(max_len).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)
        self.cut = cut

    def forward(self, input_ids):
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)
        cos = self.cos_cached[:T]
        sin = self.sin_cached[:T]
        mask = torch.full((T, T), float("-inf"))
        mask = torch.triu(mask, diagonal=1)
        for i, layer in enumerate(self.layers):
            if self.cut and i == 1:
                pipeserve.pipe_split()
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


class EncoderClassifier(torch.nn.Module):
    def __init__(self, vocab=61, d=32, heads=4, layers=3, classes=5, cut=True):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1,
                                                 activation="gelu", batch_first=True)
        # enable_nested_tensor=False: PyTorch's no_grad fast path would zero
        # the outputs at padded positions (README: what pipeserve computes).
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, classes)
        self.cut = cut

    def forward(self, ids, pad_mask):
        x = self.embed(ids)
        if self.cut:
            pipeserve.pipe_split()
        x = self.encoder(x, src_key_padding_mask=pad_mask)
        return self.head(x.mean(dim=1))


# split_spec cuts equivalent to the pipe_split() markers above (the
# encoder's split_spec cuts inside torch.nn.TransformerEncoder instead).
SPLIT_SPECS = {
    "gpt2": {"h.1": pipeserve.SplitPoint.BEGINNING,
             "h.3": pipeserve.SplitPoint.BEGINNING},
    "llama": {"layers.1": pipeserve.SplitPoint.BEGINNING},
    "encoder": {"encoder.layers.2": pipeserve.SplitPoint.BEGINNING},
}


def make(name, cut=True, seed=0):
    torch.manual_seed(seed)
    model = {"gpt2": Gpt2, "llama": Llama, "encoder": EncoderClassifier}[name](cut=cut)
    return model.eval()


def vocab(name):
    return {"gpt2": 97, "llama": 89, "encoder": 61}[name]
