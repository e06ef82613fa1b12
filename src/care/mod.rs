//! How the repository is looked after: verify, forget, prune, gc, repair,
//! and copy to another repository.

pub mod copy;
pub mod forget;
pub mod gc;
pub mod prune;
pub mod repair;
pub mod verify;
