"""Source side: adapters that turn record changes into events, and the publisher."""
