pub mod compile;
pub mod diagnostic;
pub mod diff;
pub mod evaluate;
pub mod lint;
pub mod load;
pub mod model;
pub mod schema;
