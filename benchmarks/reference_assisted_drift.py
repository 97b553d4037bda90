"""How often transformers' assisted loop drafts differently from a clean state.

Records SinglePositionMultiTokenCandidateGenerator's candidates per round during
`generate(assistant_model=...)` on the miniature fixtures, and compares each with the drafts the
same generator proposes when the target state is recomputed over the accepted prefix only (what
our engine feeds its drafter). Needs the test extra.

    python benchmarks/reference_assisted_drift.py [WORK_DIR]
"""

import sys
from pathlib import Path

import numpy as np
import torch
from transformers.generation import candidate_generator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import reference_models as ref  # noqa: E402
from test_generate import reference_drafts  # noqa: E402

Generator = candidate_generator.SinglePositionMultiTokenCandidateGenerator


def main():
    torch.set_num_threads(1)
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/assisted-drift")
    for variant in ("31b", "e2b"):
        target_dir, draft_dir = ref.build_pair(variant, work / variant)
        target = ref.load_reference_target(target_dir)
        drafter = ref.load_reference_drafter(draft_dir, num_assistant_tokens=3)
        window = ref.spec_for(variant).sliding_window
        prompt = [2] + np.random.default_rng(0).integers(110, 512, size=window // 2).tolist()

        rounds, original = [], Generator.get_candidates

        def recording(self, input_ids, *args, **kwargs):
            ids, logits = original(self, input_ids, *args, **kwargs)
            if ids.shape[1] > input_ids.shape[1]:
                rounds.append((input_ids[0].tolist(), ids[0, input_ids.shape[1] :].tolist()))
            return ids, logits

        Generator.get_candidates = recording
        try:
            with torch.no_grad():
                target.generate(
                    torch.tensor([prompt]), assistant_model=drafter, max_new_tokens=3 * window,
                    do_sample=False, eos_token_id=None, pad_token_id=0,
                )
        finally:
            Generator.get_candidates = original

        same = [reference_drafts(target, drafter, ids[:-1], ids[-1], len(c)) == c for ids, c in rounds]
        inside = [len(ids) <= window for ids, _ in rounds]
        print(
            f"{variant}: {len(rounds)} rounds, {sum(same)} with the clean-state drafts; first round equal: {same[0]}; "
            f"within the window {sum(s for s, i in zip(same, inside) if i)}/{inside.count(True)}, "
            f"beyond it {sum(s for s, i in zip(same, inside) if not i)}/{inside.count(False)}"
        )


if __name__ == "__main__":
    main()
