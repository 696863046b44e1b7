//! Batch inference over whole datasets: the input list (files, directories,
//! manifests), sharding over a scheduler, the decode → batch → worker →
//! writer pipeline, resumable JSON-lines outputs, and `collect`, which
//! merges shard outputs.

pub mod collect;
pub mod inputs;
pub mod jsonl;
pub mod pipeline;
pub mod shard;

pub use self::inputs::{Input, InputList, gather_inputs};
pub use self::jsonl::{JsonlOutput, OutputMode};
pub use self::pipeline::{BatchWorker, Decoded, PipelineOptions, run_pipeline};
pub use self::shard::Shard;
