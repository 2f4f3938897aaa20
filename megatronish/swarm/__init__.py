"""SWARM parallelism: train a GPT over unreliable, heterogeneous peers (see README, "SWARM").

The stage computation (stage.py), the arguments (arguments.py) and the rebalancing rule
(rebalancing.py) need only torch; the networked parts (peers, trainers) need hivemind,
the `swarm` extra: pip install 'megatronish[swarm]'.
"""
