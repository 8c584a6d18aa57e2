"""The judge stage: grader prompts, judge calls (API or in-process model), verdicts, and the
resumable orchestration that writes one judgment row per rollout and grader."""
