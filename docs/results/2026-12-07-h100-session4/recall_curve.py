"""Prefill recall vs kept share of tile scorings on the long model (held-out task text, 8192 tokens)."""
import sys, math, torch, json
from rtpurbo_vllm.artifacts import load_artifact
from rtpurbo_vllm.calibration import evaluate as ev
from rtpurbo_vllm.calibration.capture import attention_rows, capture_retrieval
from rtpurbo_vllm.calibration.data import TokenSource, sample_sequence
from rtpurbo_vllm.triton_kernels.block_topp import expand_block_mask
from rtpurbo_vllm.triton_kernels.sparse_prefill import TILE_Q, chunk_tiles, tile_forced_blocks, tile_topp_ref
M = "rtpurbo_vllm/tiny/long_model"
seq_len, nseq = int(sys.argv[1]), int(sys.argv[2])
lm = ev.resolve_model(M, None)
art = load_artifact(M + "/rtpurbo", hf_config=lm.hf_config)
p = art.params
PS = [0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]
MODES = ["mean", "max", "meanprob"]
acc = {(m, tp): [0.0, 0.0, 0.0, []] for m in MODES for tp in PS}   # recall sum, kept, visible, recalls
retrieval = [list(h) for h in art.retrieval_heads]
source = TokenSource.create(lm.tokenizer, "/tmp/long-cal/task.txt", "heldout")
def mass(mode, q, k, bs):
    logits = torch.einsum("qhi,thi->hqt", q.float(), k.float())
    if mode == "max": probs = logits.amax(1).softmax(-1)
    elif mode == "meanprob": probs = logits.softmax(-1).mean(1)
    else: probs = torch.einsum("hi,thi->ht", q.float().mean(0), k.float()).softmax(-1)
    nb = math.ceil(k.shape[0] / bs)
    return torch.nn.functional.pad(probs, (0, nb * bs - k.shape[0])).view(probs.shape[0], nb, bs).sum(-1)
for s in range(nseq):
    ids, _ = sample_sequence(source, seq_len, 8, 1234, s)
    cap = capture_retrieval(lm, retrieval, ids, torch.arange(len(ids)))
    for layer, heads in enumerate(retrieval):
        if not heads: continue
        w_q, w_k = art.indexer[layer]
        q_pre, k_pre = cap.q_pre[layer], cap.k_pre[layer]
        q_idx, k_idx = ev._index_vectors(lm, heads, q_pre, k_pre, w_q, w_k)
        n_tok = k_pre.shape[0]
        for tile in chunk_tiles(n_tok, n_tok, TILE_Q):
            n = tile.last_pos + 1
            real = attention_rows(q_pre[tile.row0:tile.row1], k_pre[:n], torch.arange(tile.first_pos, n), torch.tensor(heads), lm)
            forced = tile_forced_blocks(tile, p.block_size, p.sink_tokens)
            for mode in MODES:
                ms = mass(mode, q_idx[tile.row0:tile.row1], k_idx[:n], p.block_size)
                for tp in PS:
                    keep = tile_topp_ref(ms, forced, tp)
                    r = (real * expand_block_mask(keep, n, p.block_size)[:, None]).sum(-1).mean(-1)   # [HR]
                    a = acc[(mode, tp)]
                    a[0] += float(r.sum()); a[1] += float(keep.sum()); a[2] += keep.numel(); a[3] += r.tolist()
    print("seq", s, "done", flush=True)
for (mode, tp), (rs, kept, vis, rl) in acc.items():
    rl = torch.tensor(rl)
    print(f"{mode:9s} p={tp:<6} recall {rl.mean():.3f} p10 {torch.quantile(rl, 0.1):.3f} kept {kept / vis:.3f}")
