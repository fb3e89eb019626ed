//! The wallet's benchmark: a load driver for the gateway's HTTP contract (closed and open loop,
//! latency histograms, counts per status), the synchronous baseline server it is compared with,
//! `compare` (both in one run, with the ratio and the treasury lag) and `worker-only` (commands
//! already queued, gateway off). See BENCHMARKS.md for the commands.

pub mod auth;
pub mod baseline;
pub mod compare;
pub mod cpu;
pub mod disk;
pub mod driver;
pub mod http1;
pub mod procs;
pub mod report;
pub mod scenario;
pub mod seed;
pub mod trace;
pub mod worker_only;
