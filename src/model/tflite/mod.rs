//! Reading and writing TFLite flatbuffers, through the schema code tract-tflite generates.

mod read;
mod write;

pub use read::{read_graph, read_graph_shared};
pub use write::{WriteOptions, write_graph};
