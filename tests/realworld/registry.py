"""The catalogue: each failure reproduced from a public report, with the cause the
report's thread accepted and, where the cause is an operation, that operation.

``ops`` maps a framework to the canonical op names the origin may carry (the
same failure can surface as ``norm`` in torch and ``Sqrt`` in TensorFlow).
The reproductions are in cases_torch.py and cases_keras.py, written for this
catalogue; no code was copied from the reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    name: str
    url: str
    accepted: str
    cause: str
    ops: dict = field(default_factory=dict)
    frameworks: tuple = ("torch", "keras")


def _ops(torch=None, keras=None, both=None):
    return {"torch": set(torch or both or ()), "keras": set(keras or both or ())}


CATALOGUE = [
    Case("sqrt-distance", "https://github.com/open-mmlab/mmrotate/issues/205",
         "d sqrt/dx is inf at 0: a distance of exactly 0 in the loss gives a NaN gradient", "singular-op", _ops(both={"sqrt"})),
    Case("norm-smoothness", "https://github.com/pytorch/pytorch/issues/2421",
         "the 2-norm of a zero vector has a 0*inf = NaN gradient (also tensorflow/tensorflow#12071)", "singular-op",
         _ops(torch={"pow"}, keras={"sqrt"})),
    Case("acos-angle", "https://discuss.pytorch.org/t/numerically-stable-acos-dot-product-derivative/12851",
         "d acos/dx = -1/sqrt(1-x^2) is infinite at ±1; clamp(-1+eps, 1-eps)", "singular-op", _ops(both={"acos"})),
    Case("pow-negative-base", "https://github.com/pytorch/pytorch/issues/131039",
         "a fractional power of a negative base is NaN (numpy agrees)", "singular-op", _ops(both={"pow"})),
    Case("std-one-sample", "https://github.com/pytorch/pytorch/issues/29372",
         "std over one element: unbiased (n-1) divisor is 0 in torch; a 0 std divides 0/0", "singular-op",
         _ops(torch={"std"}, keras={"div"})),
    Case("mha-padding", "https://github.com/pytorch/pytorch/issues/41508",
         "a sequence whose keys are all padding: softmax over all -inf gives NaN (also #40932)", "masked-softmax",
         _ops(torch={"attention"}, keras={"softmax"})),
    Case("causal-left-padding", "https://github.com/pytorch/pytorch/issues/63271",
         "causal mask combined with padding leaves rows with no key: softmax([-inf..]) = NaN", "masked-softmax",
         _ops(both={"softmax"})),
    Case("fp16-sum-overflow", "https://github.com/tracel-ai/burn/issues/4109",
         "summing in float16 passes 65504 and becomes inf", "low-precision", _ops(both={"sum"})),
    Case("fp16-adam-eps", "https://github.com/afiaka87/glide-finetune/issues/5",
         "Adam's eps=1e-8 is 0 in float16: m/(sqrt(v)+eps) divides by 0; use eps=1e-4 "
         "(discuss.pytorch.org/t/adam-half-precision-nans/1765)", "low-precision"),
    Case("sgd-weight-decay", "https://github.com/fastai/fastai/issues/1806",
         "a huge weight decay ('try 1000, it will go nan in one epoch')", "weight-decay"),
    Case("adamw-weight-decay", "https://github.com/mlfoundations/open_clip/issues/32",
         "weight decay is applied as lr*wd per step; a value meant for another scale blows the weights up", "weight-decay"),
    Case("rnn-lm-lr20", "https://github.com/pytorch/examples/issues/846",
         "word_language_model trains at lr 20 only with clip_grad_norm (exploding gradients in RNNs)", "rnn-exploding"),
    Case("rnn-long-sequence", "https://stats.stackexchange.com/posts/487195/revisions",
         "RNNs over long sequences take a huge step off a cliff; gradient clipping fixes it", "rnn-exploding"),
    Case("labels-one-based", "https://github.com/EricFillion/happy-transformer/issues/248",
         "labels must start at 0: 'Target ... is out of bounds'", "bad-labels"),
    Case("segmentation-void-255", "https://github.com/milesial/Pytorch-UNet/issues/291",
         "masks loaded as greyscale 0/255 instead of class indices 0..n_classes-1", "bad-labels"),
    Case("log-of-softmax", "https://forums.fast.ai/t/cross-entropy-error-log-1-1-inf/1441",
         "a saturated softmax gives probability exactly 0 and log(0) = -inf", "log-zero", _ops(both={"log"})),
    Case("where-masked-relative-error", "https://github.com/tensorflow/tensorflow/issues/38349",
         "where() hides the inf of the untaken branch from the value, not from the gradient: use the double where",
         "masked-loss", _ops(both={"div"})),
    Case("nan-in-csv", "https://theneuralbase.com/tensorflow/learn/beginner/nan-loss-learning-rate-or-data/",
         "NaN cells in the training data propagate into the loss", "dirty-data"),
    Case("minmax-constant-column", "https://discuss.codecademy.com/t/what-if-the-minimum-and-maximum-values-are-the-same/381946",
         "min-max scaling of a constant column divides 0 by 0; fix or drop the column", "dirty-data"),
    Case("unscaled-features", "http://www.taourl.com/read-2589871.html",
         "inputs scaled by 1000 into a ReLU network: normalise the inputs", "unscaled-inputs"),
    Case("high-learning-rate", "https://github.com/tensorflow/tensorflow/issues/38796",
         "a high learning rate makes the loss nan or inf; lower it", "high-lr"),
]

_TORCH = ("torch",)
CATALOGUE += [
    # -- issue 19: a second set, from other public reports ---------------------------------
    Case("ctc-short-utterance", "https://github.com/k2-fsa/icefall/issues/135",
         "an utterance too short after subsampling cannot hold its transcript: CTC is inf; filter short "
         "utterances or zero_infinity=True", "ctc-infeasible", _ops(torch={"ctc_loss"}), _TORCH),
    Case("ctc-repeats", "https://github.com/ypwhs/captcha_break/issues/29",
         "a label with repeats needs a blank between them (input_length >= 2*target+1 in the worst case); "
         "a longer output fixes it", "ctc-infeasible", _ops(torch={"ctc_loss"}), _TORCH),
    Case("fp16-additive-mask", "https://github.com/NVIDIA/apex/issues/93",
         "a -1e10 (-1e15) mask value is -inf in float16; use a value float16 holds (-1e4) "
         "(also bentrevett/pytorch-seq2seq#191)", "low-precision", _ops(torch={"mul"}, keras={"mul"})),
    Case("fp16-finfo-min-mask", "https://github.com/huggingface/transformers/pull/17306",
         "finfo(float16).min plus a negative score overflows to -inf; a row with every key masked is then NaN; "
         "compute the masked softmax in float32", "low-precision", _ops(torch={"add"}, keras={"addv2"})),
    Case("layernorm-eps-fp16", "https://github.com/pytorch/pytorch/issues/41527",
         "eps=1e-12 is 0 in float16, so an all-zero (padded) row normalises 0/0 (also deepspeedai/DeepSpeed#581, "
         "tensorflow/tensorflow#24979): compute the norm in float32 or use eps >= 1e-5", "low-precision",
         _ops(both={"div"})),
    Case("normalize-eps-fp16", "https://github.com/pytorch/pytorch/issues/32137",
         "F.normalize's eps=1e-12 is 0 in float16: a zero vector gives 0/0", "low-precision",
         _ops(torch={"normalize"}, keras={"rsqrt"})),
    Case("rmsnorm-underflow", "https://github.com/huggingface/diffusers/pull/13316",
         "in float16 small activations square to 0, the norm is 0 and the division overflows: normalise in float32",
         "low-precision", _ops(both={"div"})),
    Case("cosine-zero-vector", "https://github.com/google-deepmind/optax/pull/946",
         "the cosine similarity of a zero embedding divides 0 by 0: add an epsilon to the norms", "singular-op",
         _ops(both={"div"})),
    Case("triplet-identical", "https://github.com/tensorflow/tensorflow/issues/30199",
         "a positive identical to its anchor has distance 0 and d sqrt/dx = inf: NaN gradients", "singular-op",
         _ops(both={"sqrt"})),
    Case("gcn-isolated-node", "https://github.com/mlx-graphs/mlx-graphs/pull/18",
         "an isolated node has degree 0 and deg^-1/2 = inf (also pyg-team/pytorch_geometric#61): add self-loops",
         "singular-op", _ops(both={"pow"})),
    Case("gat-isolated-node", "https://github.com/PetarV-/GAT/issues/39",
         "non-edges are masked before the softmax; a node with no neighbour and no self-loop masks its whole row",
         "masked-softmax", _ops(both={"softmax"})),
    Case("supcon-no-positive", "https://github.com/HobbitLong/SupContrast/issues/50",
         "mask.sum(1) is 0 for an anchor with no positive in the batch: the mean over positives is 0/0",
         "empty-mean", _ops(both={"div"})),
    Case("seq2seq-all-padding", "https://github.com/lucidrains/recurrent-memory-transformer-pytorch/issues/6",
         "a segment whose targets are all padding (ignore_index) gives a NaN mean", "empty-mean",
         _ops(torch={"cross_entropy"}, keras={"div"})),
    Case("vae-exp-logvar", "https://github.com/vanderschaarlab/synthcity/issues/331",
         "an unbounded log-variance overflows exp(): clamp it (diffusers clamps to [-30, 20])", "exp-overflow",
         _ops(both={"exp"})),
    Case("flow-exp-scale", "https://github.com/VincentStimper/normalizing-flows/issues/47",
         "the affine coupling's exp(s) overflows: bound s (tanh, as RealNVP) or clamp", "exp-overflow",
         _ops(both={"exp"})),
    Case("focal-log-zero", "https://github.com/mkocabas/focal-loss-keras/issues/17",
         "a saturated sigmoid gives p = 1 and log(1 - p) = -inf: compute from logits or clip", "log-zero",
         _ops(both={"log"})),
    Case("sigmoid-bce-hand", "https://github.com/hwalsuklee/tensorflow-mnist-VAE/issues/4",
         "a hand-written BCE meets log(0): use sigmoid_cross_entropy_with_logits", "log-zero", _ops(both={"log"})),
    Case("poisson-log-zero", "https://github.com/keras-team/keras/issues/590",
         "the Poisson loss takes log(y_pred) and a ReLU output is exactly 0", "log-zero", _ops(both={"log"})),
    Case("embedding-id-out-of-range", "https://github.com/ajhalthor/Transformer-Neural-Network/issues/13",
         "token ids beyond the embedding's size: 'index out of range in self'; enlarge the vocabulary", "bad-labels"),
    Case("gather-vocab-out-of-range", "https://github.com/boathit/t2vec/issues/17",
         "target ids equal to the output size: 'index ... is out of bounds'; the vocabulary sizes disagree",
         "bad-labels"),
]
BY_NAME = {c.name: c for c in CATALOGUE}
