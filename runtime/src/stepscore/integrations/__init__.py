"""Drop-in PRM adapters for the search and training frameworks people already run, each talking to a
`stepscore serve` over gRPC:

- `search_and_learn`: `StepscorePRM`, the `PRM` of huggingface/search-and-learn (`score(questions, outputs)`);
- `openr`: `StepscoreRewardModelCaller`, OpenR's reward-model calling function (`(question, answer)` pairs and
  the LM's step tag in, step rewards out);
- `trl`: `StepRewardFunction`, a reward function for TRL's `GRPOTrainer(reward_funcs=[...])`.

`common` holds what they share: step splitting, search ids derived from the question, and the pooled client.
Importing any of them loads nothing heavy (no grpc until the first call, never torch, never the framework).
"""
