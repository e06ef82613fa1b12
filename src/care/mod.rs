//! How the repository is looked after: verify, forget, prune, gc, repair.

pub mod forget;
pub mod gc;
pub mod prune;
pub mod repair;
pub mod verify;
