"""The servers `s2amnet bench --peers` measures beside `s2amnet serve`, each a small script run as its own
process (`python -m app.commands.peers.NAME --weights DIR --port N`), serving one weights folder the way
that server's documentation shows, with the service's own decoding, preprocessing, forward and answer
(`common`)."""
