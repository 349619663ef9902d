"""Test-time compute: spending more inference on a problem by sampling, verifying and searching over reasoning steps
(Snell et al. 2024, "Scaling LLM Test-Time Compute Optimally"; Lightman et al. 2023; Wang et al. 2024, Math-Shepherd).

A search runs on a *step problem*: a tree whose nodes are partial solutions, one reasoning step per edge,

    problem.root                       the prompt
    problem.expand(states, n, rng)     n sampled next steps of each state: [[child, ...], ...]
    problem.value(states)              the verifier's score of each state's last step, float[len(states)] in [0, 1]
    problem.finished(state)            whether the state ends in an answer
    problem.rollout(states, steps)     each state continued greedily by `steps` steps (or until finished)

so the same strategies drive a trained policy with its process reward model and the brute-force checks of the tests.

    voting.py     aggregation of a path's step scores (min, product, last), best-of-N, majority and weighted voting
    beam.py       verifier-guided beam search over steps, with lookahead (Snell et al. section 5)
    mcts.py       Monte Carlo tree search over steps: UCT with the verifier as value, rollouts optional
"""
