mod redis_server;
mod store;
