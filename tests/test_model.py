"""model.py against transformers' LlavaForConditionalGeneration, and generation against full forwards."""

import contextlib
import copy
import types

import torch
import pytest
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import model as M
from extras import loader
from extras.fast_inference import GraphedDecodeStep, fuse_projections

IMAGE_ID = 250  # the HF model's image token id (inside the tiny vocabulary); ours uses -200 at those positions
VOCAB = 256


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=256, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF's init leaves tiny weights; make the projector and norms matter
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path_factory.mktemp("hf_llava")
    hf.save_pretrained(folder)
    ours, _ = loader.load_hf_llava(folder, torch.float32)  # the loader chat.py / eval / convert use
    return hf, ours


def _batch(n_patches=16):
    g = torch.Generator().manual_seed(1)
    text_a = torch.randint(0, 200, (5,), generator=g).tolist()
    text_b = torch.randint(0, 200, (7,), generator=g).tolist()
    ids_hf = [text_a + [IMAGE_ID] * n_patches + text_b, text_b + [IMAGE_ID] * n_patches + text_a + text_a]
    T = max(map(len, ids_hf))
    ids_hf = [x + [0] * (T - len(x)) for x in ids_hf]  # right padding, masked out of the loss below
    ids_hf = torch.tensor(ids_hf)
    ids_ours = ids_hf.masked_fill(ids_hf == IMAGE_ID, M.IMAGE_TOKEN_INDEX)
    labels = ids_hf.clone()
    labels[ids_hf == IMAGE_ID] = M.IGNORE_INDEX
    labels[0, len(text_a) + n_patches + len(text_b):] = M.IGNORE_INDEX  # row 0's padding
    labels[:, :3] = M.IGNORE_INDEX                                     # an unsupervised prompt
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    return ids_hf, ids_ours, labels, pixels


def test_logits_and_loss_equal_transformers(hf_and_ours):
    hf, ours = hf_and_ours
    ids_hf, ids_ours, labels, pixels = _batch()
    with torch.no_grad():
        out = hf(input_ids=ids_hf, pixel_values=pixels, labels=labels)
        logits = ours.logits(ids_ours, pixels)
        loss_sum, n = ours(ids_ours, labels, pixels)
    assert (logits - out.logits).abs().max() < 1e-5
    # ours returns the summed loss and the supervised count; HF returns their mean
    assert abs(loss_sum.item() / n.item() - out.loss.item()) < 1e-5
    assert n.item() == (labels[:, 1:] != -100).sum().item()


def test_chunked_loss_equals_unchunked_with_gradients(hf_and_ours):
    _, ours = hf_and_ours
    ids_hf, ids_ours, labels, pixels = _batch()
    grads = []
    for chunk in (4096, 3):  # 3 splits the supervised positions into many chunks, each recomputed in backward
        ours.zero_grad()
        ours.loss_chunk = chunk
        ours.train()
        loss, n = ours(ids_ours, labels, pixels)
        (loss / n).backward()
        grads.append((loss.item(), ours.projector.linear_1.weight.grad.clone(), ours.llm.lm_head.weight.grad.clone()))
    ours.eval()
    ours.loss_chunk = 4096
    assert abs(grads[0][0] - grads[1][0]) < 1e-4
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    assert torch.allclose(grads[0][2], grads[1][2], atol=1e-6)


def test_frozen_vision_builds_no_graph(hf_and_ours):
    """Training with a frozen CLIP (every recipe but the ViT-LoRA one) records no autograd graph inside the tower:
    no layer output has a grad_fn and no CLIP activation is saved for backward, while the projector and the LLM
    train. (Checked against a mutant: pixels that require grad give every layer a graph, and this test fails.)"""
    _, ours = hf_and_ours
    m = copy.deepcopy(ours)
    m.requires_grad_(True)
    m.vision.requires_grad_(False)
    outputs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: outputs.append(out)) for layer in m.vision.layers]
    saved = []
    _, ids, labels, pixels = _batch()
    m.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss, n = m(ids, labels, pixels)
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    assert outputs and all(o.grad_fn is None and not o.requires_grad for o in outputs)
    clip_shaped = [t for t in saved if t.dim() == 3 and t.shape[-1] == m.vision.cfg.hidden_size]
    assert not clip_shaped, f"{len(clip_shaped)} CLIP activations saved for backward"
    assert m.projector.linear_1.weight.grad is not None and m.llm.embed_tokens.weight.grad is not None
    assert all(p.grad is None for p in m.vision.parameters())


def test_splice_counts_are_checked(hf_and_ours):
    _, ours = hf_and_ours
    _, ids, _, pixels = _batch()
    with pytest.raises(RuntimeError):  # 2 images' positions, 1 image: masked_scatter refuses a short source
        ours.logits(ids, pixels[:1])


def _greedy_reference(model, prompt, pixels, n):
    """Greedy continuation by full forwards, no cache: the definition generation must reproduce."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        logits = model.logits(torch.tensor([ids]), pixels)[0, -1]
        top2 = logits.topk(2).values
        out.append((int(logits.argmax()), float(top2[0] - top2[1])))
        ids.append(out[-1][0])
    return out


def test_generate_equals_full_forward_and_batching(hf_and_ours):
    _, ours = hf_and_ours
    ours = ours.double()
    g = torch.Generator().manual_seed(3)
    img = [M.IMAGE_TOKEN_INDEX] * 16
    prompts = [torch.randint(0, 200, (4,), generator=g).tolist() + img + torch.randint(0, 200, (3,), generator=g).tolist(),
               img + torch.randint(0, 200, (9,), generator=g).tolist(),
               torch.randint(0, 200, (2,), generator=g).tolist() + img]
    pixels = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    alone = [M.generate(ours, [p], pixels[i:i + 1], max_new_tokens=8) for i, p in enumerate(prompts)]
    batched = M.generate(ours, prompts, pixels, max_new_tokens=8)
    for i, p in enumerate(prompts):
        ref = _greedy_reference(ours, p, pixels[i:i + 1], 8)
        # in fp64 a near tie cannot flip; compare up to the first position where the top two are closer than 1e-9
        n = next((k for k, (_, gap) in enumerate(ref) if gap < 1e-9), len(ref))
        assert alone[i][0][:n] == [t for t, _ in ref][:n]
        assert batched[i][:n] == alone[i][0][:n]
    ours.float()


def test_generate_stops_and_continues_from_cache(hf_and_ours):
    _, ours = hf_and_ours
    ours = ours.double()
    prompt = [5, 6, 7] + [M.IMAGE_TOKEN_INDEX] * 16 + [8, 9]
    pixels = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    full = M.generate(ours, [prompt], pixels, max_new_tokens=6)[0]
    stopped = M.generate(ours, [prompt], pixels, max_new_tokens=6, stop_ids=[full[2]])[0]
    assert stopped == full[:full.index(full[2]) + 1]
    # a second turn on top of the cache equals generating over the whole history at once
    first = M.generate(ours, [prompt], pixels, max_new_tokens=4, max_cache_len=64)[0]
    follow = [11, 12, 13]
    cont = M.generate(ours, [[first[-1]] + follow], None, max_new_tokens=4,
                      cache_offset=len(prompt) + len(first) - 1)[0]
    whole = M.generate(ours, [prompt + first + follow], pixels, max_new_tokens=4)[0]
    assert cont == whole
    ours.float()


@pytest.mark.parametrize("queued", [False, True], ids=["host", "gpu-copy"])
def test_sync_every_and_step_fn_give_the_same_tokens(hf_and_ours, monkeypatch, queued):
    """generate(sync_every=k) brings tokens to the host k steps at a time: the tokens returned, the on_token calls
    and where each row stops are the same as with a sync every step; at most k - 1 steps run past the last stop, or
    k where the copy is queued as on a GPU (the next step is queued before the host reads: to_host's event).
    A step_fn (GraphedDecodeStep on a GPU) is called in place of decode_step with the same arguments."""
    _, ours = hf_and_ours
    ours = ours.double()
    g = torch.Generator().manual_seed(5)
    img = [M.IMAGE_TOKEN_INDEX] * 16
    prompts = [[5, 6] + img + [8, 9], img + torch.randint(0, 200, (6,), generator=g).tolist()]
    pixels = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    full = M.generate(ours, prompts, pixels, max_new_tokens=12)
    stop = [full[0][4], full[1][9]]  # row 0 stops early, row 1 late
    log = []  # what happened, in order: "step" for each decode step, a (row, token) pair for each token streamed
    if queued:  # what to_host gives from a GPU: the tokens, and an event to wait on before reading them
        monkeypatch.setattr(M, "to_host", lambda t: (t.clone(), types.SimpleNamespace(synchronize=lambda: None)))
    runs = []
    for k in (1, 3, 8, 20):
        log.clear()

        def step_fn(*args):
            log.append("step")
            return M.decode_step(*args)

        out = M.generate(ours, prompts, pixels, max_new_tokens=12, stop_ids=stop, sync_every=k,
                         on_token=lambda i, t: log.append((i, t)), step_fn=step_fn)
        streamed, steps = [e for e in log if e != "step"], [e for e in log if e == "step"]
        runs.append((out, streamed))
        n_needed = max(len(o) for o in out) - 1  # decode steps before the last row stopped
        assert n_needed <= len(steps) <= min(n_needed + k - 1 + queued, 11)
        if k == 1:  # the host reads each token before the next step, or (queued) once that step is on its way
            assert len(steps) == n_needed + queued
            assert log[:3] == ([(0, full[0][0]), (1, full[1][0]), "step"] if not queued else
                               ["step", (0, full[0][0]), (1, full[1][0])])
    for out, streamed in runs:
        assert (out, streamed) == runs[0]
    for row, s in zip(runs[0][0], stop):  # each row ends at its first stop token, as the full run predicts
        assert row[-1] == s and s not in row[:-1]
    ours.float()


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert M.sample(logits).item() == 2
    assert M.sample(logits, temperature=1.0, top_k=1, generator=g).item() == 2
    assert M.sample(logits, temperature=1.0, top_p=1e-6, generator=g).item() == 2
    draws = {M.sample(logits, temperature=5.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    # top-p 0.75 keeps the smallest set reaching 0.75: probabilities of [3, 2, 1, ...] are .64, .24, ...
    draws = {M.sample(logits, temperature=1.0, top_p=0.75, generator=g).item() for _ in range(300)}
    assert draws == {2, 3}


def _left_padded_prompts(seed=7):
    g = torch.Generator().manual_seed(seed)
    img = [M.IMAGE_TOKEN_INDEX] * 16
    prompts = [[5, 6] + img + torch.randint(0, 200, (7,), generator=g).tolist(),
               img + torch.randint(0, 200, (3,), generator=g).tolist()]
    return prompts, torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)


def test_fused_projections_generate_the_same_tokens(hf_and_ours, tmp_path):
    """Llama.fuse_projections changes no token of a left-padded batch or of a single prompt (fp64: no near tie can
    flip), and a fused model is not saved."""
    import copy
    _, ours = hf_and_ours
    base = copy.deepcopy(ours).double()
    prompts, pixels = _left_padded_prompts()
    want = M.generate(base, prompts, pixels, max_new_tokens=10)
    alone = M.generate(base, prompts[1:], pixels[1:], max_new_tokens=10)
    assert len({tuple(t) for t in want}) == 2  # the rows differ, so a row mix-up would show
    fuse_projections(base.llm)
    assert M.generate(base, prompts, pixels, max_new_tokens=10) == want
    assert M.generate(base, prompts, pixels, max_new_tokens=10, sync_every=4) == want
    assert M.generate(base, prompts[1:], pixels[1:], max_new_tokens=10) == alone
    with pytest.raises(ValueError, match="fuse_projections"):
        loader.save_model(base, tmp_path / "model", {"llm_mode": "frozen"})


class FakeCUDAGraph:
    """torch.cuda.CUDAGraph on the CPU. fake_graph_capture records the decode_step call made inside it; replay()
    makes that call again with the very tensors captured and writes the result into the captured output, as a
    real graph replays its kernels on fixed addresses (so new inputs must have been copied into those tensors)."""
    made = []

    def __init__(self):
        self.calls, self.replays = [], 0
        FakeCUDAGraph.made.append(self)

    def replay(self):
        self.replays += 1
        for fn, args, out in self.calls:
            out.copy_(fn(*args))


@contextlib.contextmanager
def fake_graph_capture(graph):
    """torch.cuda.graph(g): model.decode_step called inside is recorded into g. A real capture computes nothing,
    so the output is left as NaN until the first replay (its cache writes happen, but only rewrite what the
    warm-up wrote into the same slot)."""
    real = M.decode_step

    def recording(*args):
        out = real(*args)
        graph.calls.append((real, args, out))
        return out.fill_(float("nan"))

    M.decode_step = recording
    try:
        yield
    finally:
        M.decode_step = real


class FakeStream:
    def wait_stream(self, other):
        pass


def test_graphed_decode_step_logic_on_cpu(hf_and_ours, monkeypatch):
    """GraphedDecodeStep with torch.cuda's graph and stream API faked (the GPU itself: bench/chat_bench.py): the
    tokens equal plain decode_step's; it captures once per KV cache (again after the cache is rebuilt for another
    batch size or length, not when generate reuses it) and replays once per step, on the current inputs."""
    import copy
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph_capture)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    FakeCUDAGraph.made.clear()
    _, ours = hf_and_ours
    m = copy.deepcopy(ours).double()
    prompts, pixels = _left_padded_prompts()
    other, other_pixels = _left_padded_prompts(seed=8)
    step = GraphedDecodeStep()
    runs = [(prompts, pixels, 64, 1), (other, other_pixels, 64, 4),  # same batch and cache length: no new capture
            (other[:1], other_pixels[:1], 64, 1),                    # batch 1: a new cache, a new capture
            (other[:1], other_pixels[:1], 96, 1)]                    # a longer cache: a new capture
    for n, (p, px, cache_len, k) in enumerate(runs):
        want = M.generate(m, p, px, max_new_tokens=9, max_cache_len=cache_len)
        got = M.generate(m, p, px, max_new_tokens=9, max_cache_len=cache_len, step_fn=step, sync_every=k)
        assert got == want
        assert len(FakeCUDAGraph.made) == [1, 1, 2, 3][n]
        assert FakeCUDAGraph.made[-1].replays == (16 if n == 1 else 8)  # one per decode step (9 tokens, 8 steps)
    assert all(len(g.calls) == 1 for g in FakeCUDAGraph.made)
    # a replay computes from the inputs of this call, copied into the captured tensors, not from the first call's
    llm = m.llm
    pos, slot = torch.tensor([30]), torch.tensor([30])
    key_valid = torch.ones(1, 96, dtype=torch.bool)
    a = step(llm, torch.tensor([11]), pos, slot, key_valid).clone()
    b = step(llm, torch.tensor([12]), pos, slot, key_valid).clone()
    assert len(FakeCUDAGraph.made) == 3 and not torch.equal(a, b)
    torch.testing.assert_close(b, M.decode_step(llm, torch.tensor([12]), pos, slot, key_valid), atol=0, rtol=0)
