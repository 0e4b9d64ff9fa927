//! The engine trait: one way in (`submit`), one way out (`Completion::complete`).

pub(crate) mod sync;
pub(crate) mod uring;

use crate::options::EngineKind;
use crate::request::Request;

/// An I/O engine. `submit` never blocks on I/O; the engine completes every request exactly
/// once through its `Completion`, on whatever thread it likes. Dropping the engine completes
/// or fails everything it holds before returning.
pub(crate) trait Engine: Send + Sync {
    fn kind(&self) -> EngineKind;
    fn submit(&self, request: Request);
}
