"""The library every inferswarm service imports: config, logging, db, errors,
identity, the DHT discovery package (`shared.dht`) and the RPC package
(`shared.rpc`), and the process runner."""
