"""One launch of every GPU kernel of eeengine's ops, for ``compute-sanitizer`` (memcheck,
racecheck) in ``benchmarks/gpu_check.sh``: the Triton exit_head_step (every policy the fused
op implements, mean pooled and pooled input, fp32 and fp16, padded rows), the CUDA C++
exit_head_step where the extension has CUDA kernels, and the Triton token_prune. Small odd
shapes (7 rows, 83 hidden, 5 classes) so masked tails are exercised. Checks each result
against the reference too, so a kernel that runs clean but computes garbage still fails.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_ops.py
"""

from __future__ import annotations

import sys

import torch

from eeengine._custom_ops import exit_head_step, fused_op
from eeengine.policies import ExitPolicy
from eeengine.policies.budget import BudgetPolicy
from eeengine.policies.elbert import ElbertPolicy
from eeengine.policies.entropy import EntropyPolicy
from eeengine.policies.lte import LtePolicy
from eeengine.policies.max_prob import MaxProbPolicy
from eeengine.policies.mpee import MpeePolicy
from eeengine.policies.none import NoExitPolicy
from eeengine.policies.normalized_entropy import NormalizedEntropyPolicy
from eeengine.policies.patience import PatiencePolicy
from eeengine.policies.pcee import PceePolicy
from eeengine.token_pruning import token_prune_reference

# Every policy at parameters that split the batch; those the fused op implements are run.
POLICIES = [
    EntropyPolicy(0.9), NormalizedEntropyPolicy(0.5), MaxProbPolicy(0.5),
    PatiencePolicy(patience=2), PceePolicy(0.5, 2), BudgetPolicy(layer=2), NoExitPolicy(),
    ElbertPolicy(0.5), ElbertPolicy(0.5, 3, "stable"), ElbertPolicy(0.5, 2, "range", 0.1),
    MpeePolicy(0.9), LtePolicy(0.5),
]  # fmt: skip


def exit_step_args(policy: ExitPolicy, dtype: torch.dtype, pooled: bool) -> list:
    """Arguments of exit_head_step for ``policy`` on CPU: 7 rows, 9 tokens (row r padded by
    r), hidden 83, 5 classes, layer 2 of 4, rows latched into 10 output rows."""
    gen = torch.Generator().manual_seed(7)
    batch_size, seq_len, hidden_size, num_labels = 7, 9, 83, 5
    hidden = torch.randn(batch_size, seq_len, hidden_size, generator=gen).to(dtype)
    mask = (torch.arange(seq_len) < (seq_len - torch.arange(batch_size))[:, None]).long()
    if pooled:
        hidden, mask = hidden[:, 0], None
    state = policy.init_state(batch_size, torch.device("cpu"), num_labels)
    lte_score = torch.rand(batch_size, generator=gen) if policy.needs else None
    return [
        hidden, mask, torch.randn(num_labels, hidden_size, generator=gen).to(dtype),
        torch.randn(num_labels, generator=gen).to(dtype), policy.op_code,
        policy.op_params(2), 2, 4, [state[key] for key in policy.op_state_keys],
        torch.randperm(10, generator=gen)[:batch_size], torch.zeros(10, num_labels),
        torch.zeros(10, dtype=torch.long), lte_score,
    ]  # fmt: skip


def to_cuda(a: object) -> object:
    """``a`` with every tensor (and tensor in a list) copied to the GPU."""
    if isinstance(a, list):
        return [to_cuda(x) for x in a]
    return a.cuda() if torch.is_tensor(a) else a


def check_exit_ops() -> int:
    """Every fused policy through the Triton op and, where built, the CUDA C++ op; the C++ CPU
    op on the same inputs is the reference (exits and latched rows exactly, logits to 1e-4).
    Returns the number of launches."""
    ops = {"triton": fused_op("triton")}
    if torch._C._dispatch_has_kernel_for_dispatch_key("eeengine::exit_head_step", "CUDA"):
        ops["cuda"] = exit_head_step
    launches = 0
    for policy in (p for p in POLICIES if p.op_code is not None):
        for dtype in (torch.float32, torch.float16):
            for pooled in (False, True):
                ref_args = exit_step_args(policy, dtype, pooled)
                ref_logits, ref_exit = exit_head_step(*ref_args)
                for name, op in ops.items():
                    args = to_cuda(exit_step_args(policy, dtype, pooled))
                    logits, exits = op(*args)
                    what = f"{name} {policy!r} {dtype} pooled={pooled}"
                    torch.testing.assert_close(logits.cpu(), ref_logits, atol=1e-4, rtol=1e-4)
                    assert torch.equal(exits.cpu(), ref_exit), f"{what}: exits differ"
                    assert torch.equal(args[11].cpu(), ref_args[11]), f"{what}: latch differs"
                    for got, ref in zip(args[8], ref_args[8], strict=True):  # policy state
                        torch.testing.assert_close(got.cpu(), ref, atol=1e-4, rtol=1e-4)
                    launches += 1
    return launches


def check_token_prune() -> int:
    """The Triton token_prune against its reference at two widths (odd and a power of two)."""
    from eeengine.kernels.token_prune import token_prune

    launches = 0
    for seq_len in (13, 64):
        gen = torch.Generator().manual_seed(seq_len)
        batch_size, heads, head_size = 5, 3, 16
        hidden = torch.randn(batch_size, seq_len, heads * head_size, generator=gen)
        lengths = seq_len - 2 * torch.arange(batch_size)
        mask = (torch.arange(seq_len) < lengths[:, None]).long()
        query = torch.randn(batch_size, heads, head_size, generator=gen)
        key = torch.randn(batch_size, heads, seq_len, head_size, generator=gen)
        memory = torch.rand(batch_size, seq_len - 1, generator=gen)
        args = (hidden, mask, query, key, memory)
        ref = token_prune_reference(*args, 0.6, 0.5)
        got = token_prune(*to_cuda(list(args)), 0.6, 0.5)
        torch.testing.assert_close(got.hidden_states.cpu(), ref.hidden_states)
        assert torch.equal(got.attention_mask.cpu(), ref.attention_mask)
        launches += 1
    return launches


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("sanitize_ops needs a CUDA GPU")
    launches = check_exit_ops() + check_token_prune()
    torch.cuda.synchronize()
    print(f"sanitize_ops: {launches} kernel launches checked against the reference")


if __name__ == "__main__":
    main()
