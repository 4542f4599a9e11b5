//! The daemon's configuration: the model (`lb-model`), shared with the controller and `lbctl`.

pub use lb_model::*;
