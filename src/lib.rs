//! memaflow: runs several neural networks on every camera frame of a small ARM board,
//! loading and executing them layer by layer so that they fit in memory far smaller than
//! the models. See `docs/architecture.md` for the module map.

#![warn(missing_docs, unnameable_types)]

pub mod bench;
pub mod commands;
pub mod memory;
pub mod model;
mod names;
pub mod notify;
pub mod profile;
#[cfg(feature = "publish")]
pub mod publish;
pub mod runtime;
pub mod spool;
pub mod tiling;

/// Counts what each thread keeps allocated (`memory::heap`): a plan template's bytes.
#[global_allocator]
static ALLOCATOR: memory::heap::CountingAllocator = memory::heap::CountingAllocator;
