"""The digits demo: scikit-learn's handwritten digits at 16x16, rectified-flow teachers trained
here, a digit classifier, and the evaluator that scores samples by it (accuracy, Frechet
distance).  Nothing in flowpress imports this package; recipes name its evaluator."""
