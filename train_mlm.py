"""
Stage 0 - encoder masked-language-model (MLM) pre-training.

15% of the real tokens are replaced by [MASK]; the encoder (bidirectional, dense SwiGLU) and the MLM head predict
them. This gives the encoder - and the embedding it shares with the decoder - its language before the decoder
joins in. Metric: masked-token accuracy (the RxT-Alpha cards report ~80% for Micro after SFT, ~62% for Mini).

    python train_mlm.py config/nano_mlm.py [--key=value ...]
"""

import os

import cli
import training
from data.loaders import get_lm_batch, mlm_inputs
from data.tokenizer import Tokenizer

DEFAULTS = dict(training.TRAIN_DEFAULTS, data_dir="data/cache/world", seq_len=128, mask_prob=0.15,
                out_dir="out/nano/mlm")


def main(argv):
    cfg = cli.configure(DEFAULTS, argv)
    device, ctx, rank, world = training.setup(cfg, dict(mask_prob=cli.between(0.01, 0.9)))
    cli.require_files(cfg["data_dir"], ["tokenizer.tiktoken", "train.bin", "val.bin"], cli.WORLD_HINT)
    tok = Tokenizer.from_file(os.path.join(cfg["data_dir"], "tokenizer.tiktoken"))
    model = training.init_model(cfg, tok, device)

    def get_batch(split, step, g):  # (B, T) windows of [BOS] story [EOS] [BOS] story ...
        return get_lm_batch(os.path.join(cfg["data_dir"], f"{split}.bin"), cfg["batch_size"], cfg["seq_len"],
                            device, generator=g)

    def loss_fn(model, ids, step, g):
        attn_mask = ids != tok.pad_id
        masked, targets = mlm_inputs(ids, attn_mask, tok.mask_id, cfg["mask_prob"], g)
        _, loss, acc = model.mlm(masked, attn_mask, targets)
        return loss, {"mlm_loss": loss.detach(), "mlm_acc": acc, "tokens": ids.numel()}

    # only what MLM trains: the shared embedding, the encoder and the MLM head
    params = [p for n, p in model.named_parameters() if n.split(".")[0] in ("embed", "encoder", "mlm_head")]
    return training.train(cfg, model, stage="mlm", get_batch=get_batch, loss_fn=loss_fn, params=params, device=device,
                          ctx=ctx, rank=rank, world=world, tokenizer=tok)


if __name__ == "__main__":
    cli.run(main)
