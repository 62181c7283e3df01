//! The appliance side: frames in, results out. The daemon (`memaflow run`) watches a spool
//! directory, runs every configured model on every frame, and writes one result per frame;
//! see `docs/spool.md`.

pub mod config;
pub mod crop;
pub mod daemon;
pub mod demo;
pub mod fsutil;
pub mod layout;
pub mod metrics;
pub mod pipeline;
pub mod preprocess;
pub mod publish_config;
pub mod results;
pub mod schema;
pub mod show;
pub mod status;
