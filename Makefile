# The two commands a user types; the scripts set up the environment themselves (.ci/setup).
.PHONY: demo test

demo:
	./.ci/demo $(ARGS)

test:
	./.ci/test $(ARGS)
