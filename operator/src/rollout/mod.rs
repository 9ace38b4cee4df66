//! The release planner: a pure function from (spec, status, what was observed, now) to the next status and
//! the desired state of workloads and traffic. No client, no clock, no randomness; the controller does the IO.

mod plan;
pub mod simulate;
mod stages;

pub use plan::*;
pub use stages::{ReleaseStrategy, Stage, stages, strategy};

#[cfg(test)]
mod tests;
