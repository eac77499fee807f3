"""Embeddings and reranking on a CUDA GPU: tiny random encoders (BERT as a sentence-transformers
directory with mean pooling, XLM-R with CLS pooling, their one-label cross-encoders) and a
Qwen3 decoder embedder (last-token pooling), served by Soberana on CUDA, against `transformers`
on CUDA with the same weights (float32, padded batches, SDPA).

Bounds: float32 embeddings cosine >= 0.99999 and scores within 1e-5 (both sides float32,
TF32 off: different kernels, sums in another order). bfloat16 (ours) against the float32
reference: cosine >= 0.999 and scores within 5e-3: bfloat16 keeps 8 bits of mantissa, so each
layer's rounding (~0.4% per element) is visible. Measured on a CPU with the same PyTorch path
(SDPA by length groups), 300 texts: XLM-R bfloat16 min cosine 0.99997, cross-encoder score
error 9e-5; float32 min cosine 0.9999999, score error 0. The attention of bfloat16 encoders on sm80+ is FlashAttention's
variable-length kernel over the packed rows (ops/encoder.py), checked here against the SDPA
path it replaces.
"""

from __future__ import annotations

import random

import openai
import pytest
import torch
import torch.nn.functional as F
import transformers

from soberana import LLM
from soberana.ops import encoder as encoder_ops
from tests.embeddings import tiny_encoders
from tests.server.helpers import API_KEY, ServerProcess

pytestmark = pytest.mark.gpu

COSINE_MIN = {"float32": 0.99999, "bfloat16": 0.999}
SCORE_ATOL = {"float32": 1e-5, "bfloat16": 5e-3}
# the tiny XLM-R's position table: 128 rows, positions counted from past its padding index 0
XLMR_MAX_TOKENS = 127
WORDS = ("the engine packs sequences of different lengths into one batch without padding "
         "sovereign inference keeps prompts on hardware the organisation controls paris "
         "capital france bananas yellow dónde está la biblioteca café naïve 2026").split()


@pytest.fixture(scope="module")
def device() -> str:
    return "cuda"


@pytest.fixture(scope="module")
def engine_args(device) -> dict:
    """The engine's device (and nothing else: compute_backend auto is Triton's on CUDA)."""
    return {"device": device}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict:
    """{kind: directory}: "bert" a sentence-transformers directory (mean pooling); "xlmr"
    plain (CLS pooling, the default without modules.json); "bert-cross", "xlmr-cross"."""
    dirs = {}
    for kind in ("bert", "xlmr", "bert-cross", "xlmr-cross"):
        out = tiny_encoders.build(kind, tmp_path_factory.mktemp(kind.replace("-", "_")))
        if kind == "bert":
            tiny_encoders.sentence_transformers_files(out, "mean", 64, normalize=False)
        dirs[kind] = out
    return dirs


def texts_of_varied_length(n: int, seed: int = 0, longest: int = 110) -> list[str]:
    """`n` texts of 1 to `longest` words (a few more tokens each: [CLS], [SEP], word pieces)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest)))
            for _ in range(n)]


def hf_embeddings(path, texts: list[str], pooling: str, device: str,
                  max_length: int | None = None) -> torch.Tensor:  # fmt: skip
    """transformers in float32 on `device`, padded batches of 32 (cut to `max_length` tokens):
    mean over the mask or CLS."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    out = []
    for i in range(0, len(texts), 32):
        enc = tok(texts[i:i + 32], padding=True, truncation=max_length is not None,
                  max_length=max_length, return_tensors="pt").to(device)
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        if pooling == "mean":
            mask = enc["attention_mask"][..., None].float()
            out.append((hidden * mask).sum(1) / mask.sum(1))
        else:
            out.append(hidden[:, 0])
    return torch.cat(out).cpu()


def hf_scores(path, query: str, docs: list[str], device: str) -> torch.Tensor:
    """transformers' one-label cross-encoder in float32 on `device`: sigmoid(logit)."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32).to(device).eval()
    enc = tok([query] * len(docs), docs, padding=True, truncation="only_second",
              return_tensors="pt").to(device)
    with torch.no_grad():
        return torch.sigmoid(model(**enc).logits[:, 0]).cpu()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, head_dim", [(12, 64), (4, 16)])
def test_flash_varlen_attention_equals_sdpa_by_length_groups(heads, head_dim, dtype):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("FlashAttention varlen needs sm80+")
    torch.manual_seed(0)
    lens = [1, 7, 8, 9, 15, 16, 17, 33, 200, 3, 256, 64]
    seqs = encoder_ops.PackedSeqs(lens, torch.device("cuda"))
    qkv = torch.randn(sum(lens), 3 * heads * head_dim, device="cuda").to(dtype)
    scale = head_dim**-0.5
    ours = encoder_ops.flash_varlen_encoder_attention(qkv, seqs, heads, scale)
    ref = encoder_ops.torch_encoder_attention(qkv.float(), seqs, heads, scale)  # same inputs
    assert ours.dtype == dtype and ours.shape == ref.shape
    # FlashAttention rounds the probabilities to `dtype` before P @ V, and its output once
    torch.testing.assert_close(ours.float(), ref, atol=2e-2, rtol=2e-2)
    # no sequence sees another's keys: the first two alone give the same rows (to rounding:
    # the kernel may split the keys differently for another batch)
    alone = encoder_ops.flash_varlen_encoder_attention(
        qkv[:lens[0] + lens[1]], encoder_ops.PackedSeqs(lens[:2], torch.device("cuda")), heads,
        scale)
    torch.testing.assert_close(ours[:lens[0] + lens[1]], alone, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind, pooling", [("bert", "mean"), ("xlmr", "cls")])
def test_embeddings_equal_transformers(encoders, device, engine_args, kind, pooling, dtype):
    texts = texts_of_varied_length(40, seed=1)
    llm = LLM(str(encoders[kind]), **engine_args, dtype=dtype)
    info = llm.engine.model_info
    assert info.task == "embed" and info.device.startswith(device) and info.dtype == dtype
    attention = info.compute["kernels"]["attention/LayerNorm"]
    flash = device == "cuda" and dtype == "bfloat16" and torch.cuda.get_device_capability() >= (8, 0)
    assert attention.startswith("FlashAttention varlen" if flash else "PyTorch SDPA"), attention
    ours = torch.tensor(llm.embed(texts))
    ref = hf_embeddings(encoders[kind], texts, pooling, device)
    cos = F.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() >= COSINE_MIN[dtype], cos.min()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["bert-cross", "xlmr-cross"])
def test_cross_encoder_scores_equal_transformers(encoders, device, engine_args, kind, dtype):
    query = "what is the capital of france"
    docs = texts_of_varied_length(24, seed=2, longest=60) + ["paris", "x"]
    llm = LLM(str(encoders[kind]), **engine_args, dtype=dtype)
    assert llm.engine.model_info.task == "rerank"
    ours = torch.tensor(llm.score(query, docs))
    ref = hf_scores(encoders[kind], query, docs, device)
    torch.testing.assert_close(ours, ref, atol=SCORE_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_300_inputs_of_varied_length_run_in_packed_batches(encoders, device, engine_args, dtype):
    """A token budget of 2,048 splits 300 inputs (~45 tokens each) into several packed steps;
    each input's vector is what it is alone in a padded reference batch."""
    texts = texts_of_varied_length(300, seed=3)
    llm = LLM(str(encoders["bert"]), **engine_args, dtype=dtype, max_num_batched_tokens=2048)
    steps = []
    step = llm.engine.step
    llm.engine.step = lambda: steps.append(len(llm.engine.waiting)) or step()
    ours = torch.tensor(llm.embed(texts))
    assert len(steps) >= 4, steps
    ref = hf_embeddings(encoders["bert"], texts, "mean", device)
    cos = F.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() >= COSINE_MIN[dtype], (cos.min(), cos.argmin())


@pytest.mark.parametrize("scheme", ["int8", "int8_w8a16"])
def test_an_int8_encoder_runs_on_this_devices_kernels(encoders, device, engine_args, scheme):
    """`--quantization int8` on an encoder: its layers' linears quantized for the device's int8
    kernels (Triton's on CUDA), embeddings close to float32 transformers'. A tiny random BERT
    barely moves under int8 (a CPU measured cosine 0.9999997), so the bound is bfloat16's."""
    texts = texts_of_varied_length(40, seed=5)
    llm = LLM(str(encoders["bert"]), **engine_args, dtype="bfloat16", quantization=scheme)
    linears = llm.engine.model_info.compute["kernels"]["linears"]
    assert linears.startswith(f"{scheme}: "), linears
    ours = torch.tensor(llm.embed(texts))
    ref = hf_embeddings(encoders["bert"], texts, "mean", device)
    cos = F.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() >= COSINE_MIN["bfloat16"], cos.min()


def test_an_overlong_input_is_refused_unless_truncation_is_asked(encoders, device, engine_args):
    llm = LLM(str(encoders["xlmr"]), **engine_args, dtype="float32")
    long_text = "sovereign inference " * 100  # > 127 tokens
    with pytest.raises(ValueError, match=f"limit is {XLMR_MAX_TOKENS}"):
        llm.embed(long_text)
    [ours] = llm.embed(long_text, truncate_prompt_tokens=-1)
    ref = hf_embeddings(encoders["xlmr"], [long_text], "cls", device, XLMR_MAX_TOKENS)
    assert F.cosine_similarity(torch.tensor([ours]), ref, dim=-1).min() >= COSINE_MIN["float32"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decoder_embedder_pools_the_last_token(tmp_path_factory, device, engine_args, dtype):
    dirs = tiny_encoders.build_decoder_embedders(tmp_path_factory)
    texts = ["a", "sovereign inference on hardware the organisation controls", "café naïve",
             "GPU CPU embeddings " * 12, "hola"]
    llm = LLM(str(dirs["st"]), **engine_args, dtype=dtype)
    assert llm.engine.model_info.task == "embed"
    ours = torch.tensor(llm.embed(texts))
    ref = tiny_encoders.last_token_reference(dirs["headless"], texts, "right", device)
    cos = F.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() >= COSINE_MIN[dtype], cos


def test_the_server_embeds_on_the_gpu_through_the_openai_client(tmp_path, encoders, device):
    texts = texts_of_varied_length(64, seed=4)
    proc = ServerProcess(tmp_path / "server.log", "--device", device, "--dtype", "float32",
                         "--served-model-name", "bert", model=str(encoders["bert"]))
    try:
        server = proc.start()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        got = client.embeddings.create(model="bert", input=texts)
        models = client.models.list().data
    finally:
        proc.stop()
    ours = torch.tensor([d.embedding for d in got.data])
    ref = hf_embeddings(encoders["bert"], texts, "mean", device)
    assert F.cosine_similarity(ours, ref, dim=-1).min() >= COSINE_MIN["float32"]
    assert got.usage.prompt_tokens > len(texts)
    assert models[0].id == "bert"
