//! Reading and writing TFLite flatbuffers, through the schema code tract-tflite generates:
//! the file, its tensors and buffers here; each operator's options with its family in
//! `model/ops/`.

mod read;
mod write;

pub(crate) use read::raw_u64_field;
pub use read::{read_graph, read_graph_shared};
pub use write::{WriteOptions, write_graph};
