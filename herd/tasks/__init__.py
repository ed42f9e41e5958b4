"""The tasks of the one training loop, one module each: `text` (pretraining), `vision` (image adapter),
`sft`, `reward` (rm), `dpo` and `ppo`. The contract they implement and the registry `herd train NAME`
uses live in `herd.task`."""
