//! The appliance side: frames in, results out. The daemon (`memaflow run`) watches a spool
//! directory, runs every configured model on every frame, and writes one result per frame;
//! see `docs/spool.md`.

pub mod config;
pub(crate) mod crop;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub(crate) mod fsutil;
pub(crate) mod layout;
pub(crate) mod metrics;
pub(crate) mod pipeline;
pub mod preprocess;
pub(crate) mod publish_config;
mod resize;
pub(crate) mod results;
pub mod schema;
pub mod show;
pub mod status;
