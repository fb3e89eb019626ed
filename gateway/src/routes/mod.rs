pub mod accounts;
pub mod admin;
pub mod commands;
pub mod health;
pub mod ops;
pub mod v1;
pub mod wallet;
