//! The appliance side: frames in, results out. Decoding and preprocessing live here.

pub mod demo;
pub mod preprocess;
pub mod results;
