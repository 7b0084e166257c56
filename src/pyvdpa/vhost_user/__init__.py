"""vhost-user: codec, back-end, front-end and transport."""
