//! Everything more than one process needs: the domain, the wire format, the broker topology,
//! database bootstrap, configuration and telemetry.

pub mod audit;
pub mod backoff;
pub mod broker;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod ids;
pub mod metrics;
pub mod ownership;
pub mod partition;
pub mod results;
pub mod shutdown;
pub mod telemetry;
pub mod testing;
pub mod wire;

pub use error::SharedError;
