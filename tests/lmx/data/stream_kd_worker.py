"""Run by test_data_stream.py in a fresh process: KD steps on a 2 GiB text stream generated on the
fly, under an address-space limit far below the corpus size. Prints one JSON line."""
import json
import os
import resource
import sys

import numpy as np

GIB = 2 ** 30
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()
SHARDS, DOCS_PER_SHARD, DOC_CHARS = 16, 2 ** 16, 2048  # 16 * 65536 * 2048 B = 2 GiB


def docs(shards):
    for s in shards:
        rng = np.random.default_rng(s)
        for _ in range(DOCS_PER_SHARD):
            w = rng.integers(0, len(WORDS), DOC_CHARS // 4)
            yield {"text": " ".join(WORDS[j] for j in w)[:DOC_CHARS]}


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb():
    """This process's own peak RSS (VmHWM). Not ``ru_maxrss``: when the parent starts us with
    vfork, exec folds the parent's peak into ours, so a big pytest process would show through."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def vms_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def main(extra_mb: float, headroom: int):
    import datasets
    import optax
    from flax import nnx

    from lmx.backends.testing import byte_chat_tokenizer
    from lmx.data import load_text_corpus, packed_batches, stream_get_batch
    from lmx.kd import KDConfig
    from lmx.kd.trainer import (DistillConfig, KDStudent, init_student, make_loss_fn,
                                teacher_hidden_states)
    from lmx.models import ModelConfig, Transformer
    from lmx.train import TrainConfig, make_optimizer, train

    tok = byte_chat_tokenizer()
    corpus_bytes = SHARDS * DOCS_PER_SHARD * DOC_CHARS
    stream = datasets.IterableDataset.from_generator(
        docs, gen_kwargs={"shards": list(range(SHARDS))})
    stream = load_text_corpus(stream)  # checked on its first example, nothing else is read
    teacher = Transformer(ModelConfig.tiny_llama(vocab_size=len(tok), d_model=32, n_layers=2,
                                                 n_heads=2, n_kv_heads=1, d_ff=64),
                          rngs=nnx.Rngs(0))
    student = init_student(teacher, n_layers=1, init="random", d_model=16, n_heads=2,
                           n_kv_heads=1, d_ff=32, seed=1)
    model = KDStudent(student, teacher.output_embedding())
    tcfg = TrainConfig(steps=4, lr=1e-2, progress=False)
    labels = jax_tree_labels(model)
    tx = optax.multi_transform({"train": make_optimizer(tcfg), "frozen": optax.set_to_zero()},
                               labels)
    state = {}

    def kd_batches():
        for b in packed_batches(stream, tok, 64, 4, map_batch_size=64):
            yield {**b, "labels": b["tokens"].copy(),
                   "teacher_hidden": teacher_hidden_states(teacher, b["tokens"], batch_size=4)}

    feed = stream_get_batch(kd_batches())

    def get_batch(step):
        if step == 1:  # step 0 compiled: from here on the address space is capped
            state["rss_warm"] = rss_mb()
            state["limit"] = vms_bytes() + headroom
            resource.setrlimit(resource.RLIMIT_AS, (state["limit"], state["limit"]))
            try:  # control: the cap is real, the corpus could not be held
                bytearray(corpus_bytes)
                state["control"] = "allocated"
            except MemoryError:
                state["control"] = "MemoryError"
        return feed(step)

    res = train(model, make_loss_fn(DistillConfig(loss=KDConfig(), batch_size=4)), get_batch,
                tcfg, tx=tx)
    # keep reading: pack extra_mb of text (far more than one batch) under the same cap
    n_tok = 0
    for b in packed_batches(stream, tok, 512, 16, map_batch_size=64):
        n_tok += b["tokens"].size
        if n_tok >= extra_mb * 2 ** 20:
            break
    print(json.dumps({"losses": res.losses, "control": state["control"],
                      "corpus_gib": corpus_bytes / GIB, "limit_gib": state["limit"] / GIB,
                      "rss_warm_mb": state["rss_warm"], "rss_end_mb": rss_mb(),
                      "maxrss_mb": peak_rss_mb(),
                      "extra_tokens": n_tok}))


def jax_tree_labels(model):
    """optax labels: everything trains except the teacher's output projection (frozen)."""
    import jax
    from flax import nnx

    labels = jax.tree.map(lambda _: "train", nnx.state(model, nnx.Param))
    labels["teacher_head"] = jax.tree.map(lambda _: "frozen", labels["teacher_head"])
    return labels


if __name__ == "__main__":
    main(float(sys.argv[1]), int(float(sys.argv[2]) * GIB))
